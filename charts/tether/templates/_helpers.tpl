{{/*
Chart name, truncated to the 63 characters of a DNS label.
*/}}
{{- define "tether.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects. Suffixes ("-proxy", "-operator", ...) are added to it, so
it is kept to 40 characters.
*/}}
{{- define "tether.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tether.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object.
*/}}
{{- define "tether.labels" -}}
helm.sh/chart: {{ include "tether.chart" . }}
app.kubernetes.io/name: {{ include "tether.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tether
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels; pass a dict with "ctx" (the root context) and "component".
*/}}
{{- define "tether.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tether.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "tether.proxy.fullname" -}}
{{- printf "%s-proxy" (include "tether.fullname" .) }}
{{- end }}

{{/* The headless Service whose EndpointSlices the proxies follow to find their peers. */}}
{{- define "tether.proxy.peersService" -}}
{{- printf "%s-proxy-peers" (include "tether.fullname" .) }}
{{- end }}

{{- define "tether.proxy.serviceAccountName" -}}
{{- if .Values.root.serviceAccount.create }}
{{- default (include "tether.proxy.fullname" .) .Values.root.serviceAccount.name }}
{{- else }}
{{- required "root.serviceAccount.name is required when root.serviceAccount.create is false" .Values.root.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tether.operator.fullname" -}}
{{- printf "%s-operator" (include "tether.fullname" .) }}
{{- end }}

{{- define "tether.operator.serviceAccountName" -}}
{{- if .Values.leaf.serviceAccount.create }}
{{- default (include "tether.operator.fullname" .) .Values.leaf.serviceAccount.name }}
{{- else }}
{{- required "leaf.serviceAccount.name is required when leaf.serviceAccount.create is false" .Values.leaf.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tether.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/*
Pod-level security context: the image's distroless "nonroot" user (65532), RuntimeDefault
seccomp.
*/}}
{{- define "tether.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "tether.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* POD_NAME and POD_NAMESPACE from the downward API. */}}
{{- define "tether.podEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
# The admin endpoint binds to the pod's own IP (probes and scrapes come to it), not 0.0.0.0.
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- end }}

{{/* The Secret holding the proxies' Kubernetes endpoint certificate (root.kube). */}}
{{- define "tether.proxy.kubeTlsSecret" -}}
{{- default (printf "%s-kube-tls" (include "tether.proxy.fullname" .)) .Values.root.kube.tlsSecret }}
{{- end }}
