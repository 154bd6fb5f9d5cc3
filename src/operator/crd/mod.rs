//! The `tether.dev/v1alpha1` custom resources: what users write (`spec`) and what Tether
//! reports (`status`). Each type's doc comments become the CRD's descriptions, so
//! `kubectl explain reversetunnel.spec` shows them.

pub mod remote_cluster;
pub mod reverse_tunnel;
pub mod trusted_cluster;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSON, JSONSchemaProps,
};
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use remote_cluster::{RemoteCluster, RemoteClusterSpec, RemoteClusterStatus};
pub use reverse_tunnel::{ReverseTunnel, ReverseTunnelSpec, ReverseTunnelStatus};
pub use trusted_cluster::{TrustedCluster, TrustedClusterSpec, TrustedClusterStatus};

/// The API group of every Tether resource.
pub const GROUP: &str = "tether.dev";

/// A Secret in the same namespace as the object that names it. Secrets in other namespaces
/// are deliberately not reachable: a namespace's users must not be able to make the operator
/// read another namespace's keys.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    /// Name of the Secret, in the namespace of this object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Whether a condition holds, as the Kubernetes API conventions spell it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// Not known yet.
    Unknown,
}

/// One observation about an object, following the Kubernetes API conventions
/// (`metav1.Condition`), so generic tooling (`kubectl wait --for=condition=Ready`) works.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The kind of condition, e.g. `Ready` or `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// A CamelCase word saying why the condition has this status.
    pub reason: String,
    /// A human-readable explanation.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
    /// The `metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Every CRD Tether defines, in the order `tether crd` prints them (and `crds/` holds them).
pub fn all() -> Vec<CustomResourceDefinition> {
    let mut crds = vec![
        RemoteCluster::crd(),
        ReverseTunnel::crd(),
        TrustedCluster::crd(),
    ];
    for crd in &mut crds {
        let awaiting = awaiting_operator(&crd.spec.names.kind);
        for version in &mut crd.spec.versions {
            if let Some(schema) = version.schema.as_mut() {
                let mut props = schema.open_api_v3_schema.take().map(tidy_schema);
                if let (Some(props), Some(status)) = (props.as_mut(), awaiting.clone()) {
                    default_status(props, status);
                }
                schema.open_api_v3_schema = props;
            }
        }
    }
    crds
}

/// The reason of the condition an object reads with until an operator first acts on it.
pub const AWAITING_OPERATOR: &str = "WaitingForOperator";

/// The status a `ReverseTunnel` or `TrustedCluster` reads as until an operator first writes
/// one, as a schema default the API server fills in (Gateway API's "Waiting for controller").
/// Without it an object in a namespace no operator watches shows an empty `STATUS` for ever,
/// and nothing says why; with it, `kubectl get rt -o wide` shows `Pending` and the reason,
/// and `kubectl describe` what to check. The operator's first status write replaces it.
/// `RemoteCluster`s are the root's own records and get none.
fn awaiting_operator(kind: &str) -> Option<serde_json::Value> {
    let (condition, phase) = match kind {
        "ReverseTunnel" => ("Ready", Some("Pending")),
        "TrustedCluster" => ("Joined", None),
        _ => return None,
    };
    let message = format!(
        "No Tether operator has acted on this {kind} yet. If this lasts more than a few \
         seconds, no running operator watches its namespace: the chart's operator watches only \
         its release namespace unless installed with leaf.watchAllNamespaces=true (or it is \
         not running; see its pods)."
    );
    let mut status = serde_json::json!({
        "conditions": [{
            "type": condition,
            "status": "Unknown",
            "reason": AWAITING_OPERATOR,
            "message": message,
            "lastTransitionTime": "1970-01-01T00:00:00Z",
        }],
    });
    if let Some(phase) = phase {
        status["phase"] = phase.into();
    }
    Some(status)
}

/// Sets `status`'s schema default, where the schema has a `status`.
fn default_status(schema: &mut JSONSchemaProps, status: serde_json::Value) {
    if let Some(props) = schema.properties.as_mut().and_then(|p| p.get_mut("status")) {
        props.default = Some(JSON(status));
    }
}

/// Mends two things schemars writes that Kubernetes users see: `format: uint32` (and its kin),
/// which the apiserver warns about on every install ("unrecognized format"; `minimum: 0`
/// already says it), and descriptions broken where the doc comment wrapped, which
/// `kubectl explain` shows as lines ending mid-sentence.
fn tidy_schema(schema: JSONSchemaProps) -> JSONSchemaProps {
    let Ok(mut value) = serde_json::to_value(&schema) else {
        return schema;
    };
    tidy_value(&mut value);
    serde_json::from_value(value).unwrap_or(schema)
}

fn tidy_value(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            if map
                .get("format")
                .and_then(|f| f.as_str())
                .is_some_and(|f| f.starts_with("uint"))
            {
                map.remove("format");
            }
            if let Some(serde_json::Value::String(text)) = map.get_mut("description") {
                *text = unwrap_lines(text);
            }
            map.values_mut().for_each(tidy_value);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(tidy_value),
        _ => {}
    }
}

/// Joins the lines of each paragraph of a doc comment into one; paragraphs (blank lines) and
/// list items (`- `) keep their breaks.
fn unwrap_lines(text: &str) -> String {
    text.split("\n\n")
        .map(|paragraph| {
            let mut joined = String::with_capacity(paragraph.len());
            for (i, line) in paragraph.lines().enumerate() {
                if i > 0 {
                    joined.push(if line.starts_with("- ") { '\n' } else { ' ' });
                }
                joined.push_str(line);
            }
            joined
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// File name under `crds/` of each CRD, matching [`all`]'s order (file-name order).
pub const FILES: [&str; 3] = [
    "remoteclusters.tether.dev.yaml",
    "reversetunnels.tether.dev.yaml",
    "trustedclusters.tether.dev.yaml",
];

/// The CRDs as YAML documents, one per entry of [`FILES`]; each starts with `---`, so the
/// concatenation is one valid multi-document stream.
pub fn yaml_documents() -> Result<Vec<String>, serde_yaml::Error> {
    all()
        .iter()
        .map(|crd| serde_yaml::to_string(crd).map(|body| format!("---\n{body}")))
        .collect()
}
