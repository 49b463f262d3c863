#!/usr/bin/env bash
# A local stand-in for the stage images' base (python:3.11.14-slim-bookworm) where no registry can
# be reached: Debian bookworm minbase + Debian's python3, pip and venv, with the slim image's
# apt/dpkg settings, imported into podman's storage under the base's exact name so that
# `FROM python:3.11.14-slim-bookworm` resolves locally (builds run with --pull=never).
#
# How it differs from the official image: Debian's Python 3.11.2 in /usr/bin (not CPython
# 3.11.14 built in /usr/local), Debian's pip 23.0.1 with the PEP 668 EXTERNALLY-MANAGED marker
# (hence PIP_BREAK_SYSTEM_PACKAGES=1; packages land in /usr/local/lib/python3.11/dist-packages),
# no PYTHON_VERSION/GPG_KEY env, one layer, no registry digest.
#
# Usage: stand_in_base.sh STORE [IMAGE]   (as root; debootstrap, podman)
#   STORE  podman storage of the image tests (storage/, run/ and the cached rootfs tarball go there)
#   IMAGE  the base's name (default docker.io/library/python:3.11.14-slim-bookworm)
# Does nothing when IMAGE is already in STORE. Set MIRROR to use another Debian mirror.
set -euo pipefail
store=${1:?usage: stand_in_base.sh STORE [IMAGE]}
image=${2:-docker.io/library/python:3.11.14-slim-bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
podman=(podman --root "$store/storage" --runroot "$store/run" --storage-driver overlay)

if "${podman[@]}" image exists "$image"; then
    echo "stand-in base $image: already in $store"
    exit 0
fi

mkdir -p "$store"
tarball=$store/stand-in-base.tar
if [ ! -s "$tarball" ]; then
    rootfs=$store/stand-in-rootfs
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
        bookworm "$rootfs" "$mirror"

    # the official image calls its interpreter python too
    ln -sf python3 "$rootfs/usr/bin/python"
    ln -sf pip3 "$rootfs/usr/bin/pip"
    # apt sources as in debian:bookworm-slim (deb822)
    rm -f "$rootfs/etc/apt/sources.list"
    cat > "$rootfs/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # Debian's slim-image settings (debuerreotype): no docs, man pages or locales in later
    # installs, and apt cleans its caches after every install
    cat > "$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
EOF
    cat > "$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    echo 'Acquire::Languages "none";' > "$rootfs/etc/apt/apt.conf.d/docker-no-languages"
    printf 'Acquire::GzipIndexes "true";\nAcquire::CompressionTypes::Order:: "gz";\n' \
        > "$rootfs/etc/apt/apt.conf.d/docker-gzip-indexes"
    echo 'Apt::AutoRemove::SuggestsImportant "false";' > "$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests"
    # slim: what the settings above keep out of later installs, out of this one too
    find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    rm -rf "$rootfs"/usr/share/{man,info,groff,linda,locale}/* "$rootfs"/usr/share/lintian/overrides/*
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
        "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/tmp/* "$rootfs"/root/.cache
    find "$rootfs/usr/lib/python3" "$rootfs/usr/lib/python3.11" -name __pycache__ -prune -exec rm -rf {} +
    tar -C "$rootfs" --numeric-owner -cf "$tarball.partial" .
    mv "$tarball.partial" "$tarball"
    rm -rf "$rootfs"
fi

"${podman[@]}" import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' \
    --change 'CMD ["python3"]' \
    "$tarball" "$image"
echo "stand-in base $image: imported into $store"
