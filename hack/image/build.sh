#!/usr/bin/env bash
# Builds the importwaves image from the repository's Dockerfile with podman (buildah inside),
# no Docker engine: the base from hack/image/base.sh is passed as BASE_IMAGE; RUN steps use
# runc with explicit ulimits (the host's hard nofile limit makes the defaults fail) and the
# host's network (for PyPI).
#
# Cached: the image carries a label with a digest of everything that goes into it (the
# Dockerfile, the build context .dockerignore lets in, the base image's name); when the image
# already has that digest the build is skipped (a warm run: no podman build, no network).
#
#   hack/image/build.sh            build (or find) the image; print its name on stdout
#   hack/image/build.sh --digest   print "<name> <digest>" it should have; build nothing
#
# IMAGE (default localhost/importwaves:<version in pyproject.toml>) names the image.
set -euo pipefail
cd "$(dirname "$0")/../.."

version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
IMAGE=${IMAGE:-localhost/importwaves:$version}
LABEL=io.importwaves.context-digest
base=$(bash hack/image/base.sh --name)

# The build context exactly as .dockerignore lets it through (files only, sorted), plus the
# Dockerfile and the base: their contents and paths make the digest.
context_files() {
  {
    printf '%s\n' Dockerfile .dockerignore pyproject.toml README.md
    find requirements operator -type f ! -name '*.pyc' ! -path '*/__pycache__/*' \
      ! -path 'operator/*.egg-info/*'
  } | LC_ALL=C sort
}
digest=$( { echo "base=$base"; context_files | xargs sha256sum; } | sha256sum | cut -c1-32)
if [[ ${1:-} == --digest ]]; then echo "$IMAGE $digest"; exit 0; fi

have=$(podman image inspect --format "{{ index .Labels \"$LABEL\" }}" "$IMAGE" 2>/dev/null || true)
if [[ $have == "$digest" ]]; then echo "$IMAGE"; exit 0; fi

base=$(bash hack/image/base.sh)
# A TLS-inspecting egress proxy needs its CA: the host's bundle (the one pip here is told to
# use) is bind-mounted into the RUN steps only, and pip pointed at it; no layer keeps it.
ca=()
for f in "${IMAGE_BUILD_CA:-}" "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" "${REQUESTS_CA_BUNDLE:-}"; do
  if [[ -n $f && -r $f ]]; then
    ca=(--volume "$(readlink -f "$f"):/run/build-ca.crt:ro" --build-arg PIP_CERT=/run/build-ca.crt)
    break
  fi
done
echo "image: podman build $IMAGE (base $base)" >&2
log=${IMPORTWAVES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/importwaves}/image/build.log
mkdir -p "$(dirname "$log")"
t0=$(date +%s)
podman build \
  --runtime runc \
  --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 \
  --network host \
  --pull=never \
  --layers \
  --build-arg "BASE_IMAGE=$base" \
  "${ca[@]}" \
  --label "$LABEL=$digest" \
  --tag "$IMAGE" \
  --file Dockerfile \
  . >"$log" 2>&1 || { tail -n 60 "$log" >&2; echo "image: podman build failed (log: $log)" >&2; exit 1; }
echo "image: built $IMAGE in $(( $(date +%s) - t0 ))s, $(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')" >&2
echo "$IMAGE"
