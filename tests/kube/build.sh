#!/usr/bin/env bash
# Builds the pinned control-plane binaries that Tether's integration tests run:
# etcd, kube-apiserver, kube-controller-manager, kubectl and helm.
#
# Versions come from go.mod/go.sum next to this script. Binaries go to
#   ${TETHER_KUBE_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/tether/kube-<k8s version>}/
# which is outside the clone, so a fresh clone on the same machine reuses them.
# A binary is rebuilt only when it is missing or its stamp (a hash of
# go.mod + go.sum + this script) differs. Idempotent; prints the bin dir last.
#
# Needs: go (the version go.mod names, or a newer one). Uses the Go module
# proxy and Go's own build cache, so even a rebuild after a stamp change is
# mostly cached.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here"

log() { printf 'tests/kube/build.sh: %s\n' "$*" >&2; }

modver() { # module path -> version from go.mod's require block
	awk -v m="$1" '$1 == m && $2 ~ /^v/ { print $2; exit }' go.mod
}
k8s_version=$(modver k8s.io/kubernetes)
etcd_version=$(modver go.etcd.io/etcd/server/v3)
helm_version=$(modver helm.sh/helm/v4)
if [[ -z $k8s_version || -z $etcd_version || -z $helm_version ]]; then
	log "cannot read pinned versions from $here/go.mod"
	exit 1
fi

bin=${TETHER_KUBE_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/tether/kube-$k8s_version}
mkdir -p "$bin"

stamp=$(cat go.mod go.sum "$here/build.sh" | sha256sum | cut -c1-16)

# name -> Go package
declare -A pkgs=(
	[etcd]=go.etcd.io/etcd/server/v3
	[kube-apiserver]=k8s.io/kubernetes/cmd/kube-apiserver
	[kube-controller-manager]=k8s.io/kubernetes/cmd/kube-controller-manager
	[kubectl]=k8s.io/kubernetes/cmd/kubectl
	[helm]=helm.sh/helm/v4/cmd/helm
)
order=(etcd kube-apiserver kube-controller-manager kubectl helm)

missing=()
for name in "${order[@]}"; do
	if [[ -x $bin/$name && -f $bin/.$name.stamp && $(<"$bin/.$name.stamp") == "$stamp" ]]; then
		continue
	fi
	missing+=("$name")
done

if ((${#missing[@]} == 0)); then
	log "all binaries present in $bin (kubernetes $k8s_version, etcd $etcd_version, helm $helm_version); nothing to do"
	echo "$bin"
	exit 0
fi

command -v go >/dev/null || {
	log "go is not installed; it is needed to build ${missing[*]}"
	exit 1
}

minor=${k8s_version#v1.}
minor=${minor%%.*}
ldflags="-s -w"
ldflags+=" -X k8s.io/component-base/version.gitVersion=$k8s_version"
ldflags+=" -X k8s.io/component-base/version.gitMajor=1"
ldflags+=" -X k8s.io/component-base/version.gitMinor=$minor"
ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$k8s_version"
ldflags+=" -X k8s.io/client-go/pkg/version.gitMajor=1"
ldflags+=" -X k8s.io/client-go/pkg/version.gitMinor=$minor"
ldflags+=" -X helm.sh/helm/v4/internal/version.version=$helm_version"

# go.sum is complete: fail loudly rather than rewrite go.mod in the clone.
export CGO_ENABLED=0 GOFLAGS=-mod=readonly GOTOOLCHAIN=${GOTOOLCHAIN:-local}
tmp=$(mktemp -d "$bin/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

start=$SECONDS
log "building ${missing[*]} into $bin (kubernetes $k8s_version, etcd $etcd_version, helm $helm_version, $(go version | cut -d' ' -f3))"
for name in "${missing[@]}"; do
	t0=$SECONDS
	go build -trimpath -ldflags="$ldflags" -o "$tmp/$name" "${pkgs[$name]}"
	mv -f "$tmp/$name" "$bin/$name"
	echo "$stamp" >"$bin/.$name.stamp"
	log "built $name in $((SECONDS - t0))s"
done
log "done in $((SECONDS - start))s"
echo "$bin"
