#!/usr/bin/env bash
# Installs the Debian tools the image tests (tests/containers/test_images.py) build and run images
# with: podman, buildah, crun, runc, fuse-overlayfs, uidmap, debootstrap. Only as root with apt-get,
# and only when one is missing; quiet, with a log. Never fails the caller: without the tools the
# image tests say why they cannot run (they skip, or fail under CI=true).
# Usage: install_tools.sh LOG
set -uo pipefail
log=${1:?usage: install_tools.sh LOG}
tools=(podman buildah crun runc fuse-overlayfs uidmap debootstrap)
commands=(podman buildah crun runc fuse-overlayfs newuidmap debootstrap)

missing=0
for command in "${commands[@]}"; do
    command -v "$command" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$command" >/dev/null 2>&1 \
        || missing=1
done
[ "$missing" -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    exit 0
fi

mkdir -p "$(dirname "$log")"
echo "installing ${tools[*]} for the image tests (log: $log)"
{
    date
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${tools[@]}"
} >"$log" 2>&1
rc=$?
if [ "$rc" -ne 0 ]; then
    echo "warning: apt-get install failed ($rc); the image tests cannot run (see $log)" >&2
fi
exit 0
