#!/usr/bin/env bash
# The image's base, built from Debian's packages (no container registry is needed): Debian
# bookworm with its python3.11, the same Python minor and Debian release as the Dockerfile's
# default base (python:3.11.12-slim-bookworm), made with mmdebstrap and imported into podman's
# local storage as localhost/importwaves-base:<key>.
#
# <key> is a digest of this script, so a change to the recipe makes a new base; the rootfs
# tarball is cached in $IMPORTWAVES_CACHE/image (default /root/.cache/importwaves/image), so a
# warm run (image present) is a no-op and needs no network, and a run with the tarball but
# no image only re-imports it.
#
#   hack/image/base.sh          build or find the base; print its name on stdout
#   hack/image/base.sh --name   print the name it would have, build nothing
#
# What is in it: the `essential` package set plus python3.11 with its venv module (so the
# Dockerfile's build stage can make a pip-equipped virtualenv from the wheels Debian ships,
# offline), python-is-python3 (`python`), passwd (useradd), ca-certificates, tzdata, netbase.
# No compiler, no pip installed system-wide, no apt (the `essential` variant), no docs.
set -euo pipefail

SUITE=bookworm
PACKAGES=python3.11,python3.11-venv,python-is-python3,passwd,ca-certificates,tzdata,netbase
# Anything that would only bloat the image: docs, man pages, locales, apt's lists and caches.
DPKG_OPTS=(
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-exclude=/usr/share/lintian/*'
)

here=$(cd "$(dirname "$0")" && pwd)
key=$(sha256sum "$here/base.sh" | cut -c1-12)
name=localhost/importwaves-base:$key
if [[ ${1:-} == --name ]]; then echo "$name"; exit 0; fi

cache=${IMPORTWAVES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/importwaves}/image
tarball=$cache/base-$SUITE-$key.tar
mkdir -p "$cache"
exec 9>"$cache/.base.lock"
flock 9   # another build of the same cache waits here

if podman image exists "$name"; then echo "$name"; exit 0; fi

if [[ ! -s $tarball ]]; then
  echo "base image: mmdebstrap $SUITE ($PACKAGES) -> $tarball" >&2
  # The whole source list of this machine (its mirror, security and updates suites).
  tmp=$tarball.tmp.$$
  trap 'rm -f "$tmp"' EXIT
  # merged /usr set up by mmdebstrap's hook (as debootstrap does), not by the usrmerge
  # package, which would pull in the whole of perl.
  mmdebstrap --quiet --variant=essential --mode=root --format=tar \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --include="$PACKAGES" "${DPKG_OPTS[@]}" \
    --customize-hook='rm -rf "$1"/var/cache/* "$1"/var/lib/apt/lists/* "$1"/var/log/*' \
    "$SUITE" "$tmp" \
    "deb http://deb.debian.org/debian $SUITE main" \
    "deb http://deb.debian.org/debian $SUITE-updates main" \
    "deb http://deb.debian.org/debian-security $SUITE-security main" >"$tmp.log" 2>&1 || {
    tail -n 40 "$tmp.log" >&2; echo "base image: mmdebstrap failed (log: $tmp.log)" >&2; exit 1; }
  rm -f "$tmp.log"
  mv "$tmp" "$tarball"
  trap - EXIT
fi

echo "base image: podman import $tarball -> $name" >&2
podman import --quiet \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "importwaves base: Debian $SUITE + python3.11 (hack/image/base.sh $key)" \
  "$tarball" "$name" >/dev/null
echo "$name"
