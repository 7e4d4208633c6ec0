#!/usr/bin/env bash
# Build (or reuse) the pinned Kubernetes test binaries, from Go modules only, into a cache
# directory outside the repo (see bindir.sh):
#   kube-apiserver kube-controller-manager kube-scheduler kubectl   from k8s.io/kubernetes
#   etcd                                                           from go.etcd.io/etcd/server/v3
#   helm                                                           from helm.sh/helm/v3
#   kwok kwokctl                                                   from sigs.k8s.io/kwok
# A binary already in the cache is kept, so a warm run is a few stat() calls.
# GOMODCACHE and GOCACHE stay at Go's defaults, so CI on the same machine reuses them.
#
# Usage: hack/testbin/build.sh [--force]     (prints the bin dir on its last line)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$HERE/versions.env"
BIN=$("$HERE/bindir.sh")
ROOT=$(dirname "$BIN")
WORK="$ROOT/work"

K8S_BINS=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
ALL_BINS=("${K8S_BINS[@]}" etcd helm kwok kwokctl)

log() { printf 'testbin: %s\n' "$*" >&2; }

all_present() {
  local b
  for b in "${ALL_BINS[@]}"; do [[ -x "$BIN/$b" ]] || return 1; done
}

if [[ "${1:-}" == "--force" ]]; then
  rm -rf "$BIN"
elif all_present; then
  echo "$BIN"
  exit 0
fi

command -v go >/dev/null || { log "go is not on PATH (need Go >= 1.26)"; exit 1; }
mkdir -p "$BIN" "$WORK"
# One build at a time (make and the pytest fixture may both ask).
exec 9>"$ROOT/.lock"
flock 9
if all_present; then
  echo "$BIN"
  exit 0
fi

export CGO_ENABLED=0
# The module proxy here also serves the checksum database (proxy.golang.org/sumdb/...), so
# GOSUMDB stays on even where sum.golang.org itself cannot be resolved.
START=$SECONDS

build_k8s() {
  local k8s_bin_missing=0 b
  for b in "${K8S_BINS[@]}"; do [[ -x "$BIN/$b" ]] || k8s_bin_missing=1; done
  ((k8s_bin_missing)) || return 0
  local dir="$WORK/k8s-$K8S_VERSION" minor=${K8S_VERSION#*.}
  minor=${minor%%.*}
  log "k8s.io/kubernetes v$K8S_VERSION -> ${K8S_BINS[*]}"
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
  sed "s/@K8S_VERSION@/$K8S_VERSION/" "$HERE/k8s/go.mod.in" >go.mod
  # The release's own go.mod lists its staging modules as `k8s.io/x => ./staging/src/k8s.io/x`.
  go mod download k8s.io/kubernetes@"v$K8S_VERSION"
  local relmod staging m
  relmod="$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/v$K8S_VERSION.mod"
  staging=$(awk '$2 == "=>" && $3 ~ /^\.\/staging\/src\// {print $1}' "$relmod")
  [[ -n "$staging" ]] || { log "no staging replace lines found in $relmod"; exit 1; }
  for m in $staging; do
    go mod edit -replace="$m=$m@v0.${K8S_VERSION#*.}"
  done
  log "replaced $(wc -w <<<"$staging") staging modules with their v0.${K8S_VERSION#*.} tags"
  local pkgs=()
  for b in "${K8S_BINS[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  go get "${pkgs[@]/%/@v$K8S_VERSION}"
  # Stamp the version as k8s' hack/lib/version.sh does, so /version and `kubectl version`
  # report it (unstamped they say v0.0.0-master, which trips helm's kubeVersion checks).
  local ld="-s -w" p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  mkdir -p out
  go build -trimpath -tags selinux,notest,grpcnotrace -ldflags "$ld" -o out/ "${pkgs[@]}"
  for b in "${K8S_BINS[@]}"; do mv -f "out/$b" "$BIN/$b"; done
}

build_etcd() {
  [[ -x "$BIN/etcd" ]] && return 0
  local dir="$WORK/etcd-$ETCD_VERSION"
  log "go.etcd.io/etcd/server/v3 v$ETCD_VERSION -> etcd"
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
  sed "s/@ETCD_VERSION@/$ETCD_VERSION/" "$HERE/etcd/go.mod.in" >go.mod
  cp "$HERE/etcd/main.go" .
  go mod tidy
  go build -trimpath -ldflags "-s -w" -o out/etcd .
  mv -f out/etcd "$BIN/etcd"
}

build_helm() {
  [[ -x "$BIN/helm" ]] && return 0
  local minor=${K8S_VERSION#*.} ld="-s -w" p
  minor=${minor%%.*}
  log "helm.sh/helm/v3 v$HELM_VERSION -> helm (default kube version 1.$minor)"
  # As helm's Makefile does: the offline `helm template`/`helm lint` kube version.
  ld+=" -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION"
  ld+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ld+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$minor"
  done
  GOBIN="$BIN" go install -trimpath -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION"
}

build_kwok() {
  [[ -x "$BIN/kwok" && -x "$BIN/kwokctl" ]] && return 0
  log "sigs.k8s.io/kwok v$KWOK_VERSION -> kwok kwokctl"
  local ld="-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
  ld+=" -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=$K8S_VERSION"
  GOBIN="$BIN" go install -trimpath -ldflags "$ld" \
    "sigs.k8s.io/kwok/cmd/kwok@v$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@v$KWOK_VERSION"
}

for step in build_kwok build_helm build_etcd build_k8s; do
  t=$SECONDS
  "$step"
  log "$step done in $((SECONDS - t))s"
done
all_present || { log "some binaries are still missing in $BIN"; exit 1; }
log "all binaries ready in $BIN ($((SECONDS - START))s)"
echo "$BIN"
