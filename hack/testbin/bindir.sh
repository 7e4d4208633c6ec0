#!/usr/bin/env bash
# Print the cache directory that holds (or will hold) the pinned test binaries.
# IMPORTWAVES_TESTBIN overrides it; otherwise it is keyed on every pinned version.
set -euo pipefail
if [[ -n "${IMPORTWAVES_TESTBIN:-}" ]]; then
  echo "$IMPORTWAVES_TESTBIN"
  exit 0
fi
# shellcheck source=versions.env
source "$(dirname "${BASH_SOURCE[0]}")/versions.env"
root="${IMPORTWAVES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/importwaves}/testbin"
echo "$root/k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_helm-${HELM_VERSION}_kwok-${KWOK_VERSION}_r${TESTBIN_RECIPE}/bin"
