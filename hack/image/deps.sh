#!/usr/bin/env bash
# Installs what `make image` and the container e2e tier need, from Debian's packages, when it is
# missing: podman, buildah, runc (the runtime that works here; crun refuses cgroup v1 hybrid
# setups), mmdebstrap (the base image) and uidmap. A no-op when everything is there.
# Needs root (CI runs on a fresh clone as root); `apt-get update` runs once, only if needed.
set -euo pipefail

need=()
for pair in podman:podman buildah:buildah runc:runc mmdebstrap:mmdebstrap newuidmap:uidmap \
            conmon:conmon; do
  cmd=${pair%%:*} pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
# Debian's podman recommends (not depends on) these; host networking needs no CNI plugin, but
# `podman build`'s default network and `podman run` without --network do.
[[ -d /usr/lib/cni ]] || need+=(containernetworking-plugins)
((${#need[@]})) || exit 0

if [[ $(id -u) != 0 ]]; then
  echo "hack/image/deps.sh: missing ${need[*]}; install them as root:" >&2
  echo "  apt-get update && apt-get install -y --no-install-recommends ${need[*]}" >&2
  exit 1
fi
echo "installing from Debian: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
