#!/usr/bin/env bash
# Builds the stage images from the repository root, tagged exactly as the modules' container
# directives name them: ghcr.io/janeliascicomp/exllsm-<stage>:<version> (stage with dashes, version
# from src/exllsm_neuronseg/__init__.py). Run it before `nextflow run ... -profile docker` when the
# images cannot be pulled.
#
# Usage: containers/build.sh [options] [STAGE...] [-- BUILD-ARGS...]
#   STAGE           a folder of containers/ (segment_volume, scaling_factor, create_volume,
#                   train_unet); default: every folder with a Dockerfile
#   --engine CMD    the container engine, with any global options, e.g.
#                   --engine "podman --root /var/tmp/images/storage" (default: $CONTAINER_ENGINE,
#                   else docker when its daemon answers, else podman)
#   --prune         remove this project's images of other versions before the builds, and
#                   dangling images before and after them
#   --list          print "STAGE IMAGE" per stage and build nothing
#   -h, --help      this text
#   BUILD-ARGS      passed to every `<engine> build`, e.g. on a machine without a Docker daemon
#                   or a registry:  -- --isolation chroot --pull=never
#                   -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

engine=${CONTAINER_ENGINE:-}
prune=0
list=0
stages=()
build_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --engine) engine=${2:?--engine needs a value}; shift 2 ;;
        --engine=*) engine=${1#--engine=}; shift ;;
        --prune) prune=1; shift ;;
        --list) list=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; build_args=("$@"); break ;;
        -*) echo "error: unknown option '$1' (see --help)" >&2; exit 2 ;;
        *) stages+=("$1"); shift ;;
    esac
done

version=$(sed -n 's/^__version__ = "\([^"]*\)"$/\1/p' "$root/src/exllsm_neuronseg/__init__.py")
if [ -z "$version" ]; then
    echo "error: no __version__ in src/exllsm_neuronseg/__init__.py" >&2
    exit 2
fi

all=()
for dockerfile in "$root"/containers/*/Dockerfile; do
    all+=("$(basename "$(dirname "$dockerfile")")")
done
if [ ${#stages[@]} -eq 0 ]; then
    stages=("${all[@]}")
fi
for stage in "${stages[@]}"; do
    if [ ! -f "$root/containers/$stage/Dockerfile" ]; then
        echo "error: no stage '$stage': use one of ${all[*]}" >&2
        exit 2
    fi
done

image_of() { echo "ghcr.io/janeliascicomp/exllsm-${1//_/-}:$version"; }

if [ "$list" -eq 1 ]; then
    for stage in "${stages[@]}"; do
        echo "$stage $(image_of "$stage")"
    done
    exit 0
fi

if [ -z "$engine" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        engine=docker
    elif command -v podman >/dev/null; then
        engine=podman
    else
        echo "error: no container engine: neither a Docker daemon nor podman answers" >&2
        exit 2
    fi
fi
read -r -a engine_cmd <<< "$engine"

cd "$root"
if [ "$prune" -eq 1 ]; then
    # this project's images of other versions first: each TensorFlow image is ~7 GB, and a build
    # that needs the room for a new version's layers must not run out of disk beside the old ones
    for stage in "${stages[@]}"; do
        repo="$(image_of "$stage")"; repo="${repo%:*}"
        "${engine_cmd[@]}" images --format '{{.Repository}}:{{.Tag}}' 2>/dev/null | grep "^$repo:" | grep -v ":$version\$" |
            while read -r old; do "${engine_cmd[@]}" rmi "$old" >/dev/null 2>&1 || true; done || true  # none: fine
    done
    "${engine_cmd[@]}" image prune -f >/dev/null
fi
# the commit the images are built from, for the provenance records (as provenance.code_commit)
commit=$(git -C "$root" rev-parse HEAD 2>/dev/null || true)
if [ -n "$commit" ] && [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null || true)" ]; then
    commit="$commit-dirty"
fi
for stage in "${stages[@]}"; do
    image=$(image_of "$stage")
    echo "== $stage -> $image (${engine_cmd[0]})"
    start=$SECONDS
    "${engine_cmd[@]}" build --build-arg "EXLLSM_COMMIT=$commit" "${build_args[@]}" -f "containers/$stage/Dockerfile" -t "$image" .
    echo "== $stage built in $((SECONDS - start)) s"
done
if [ "$prune" -eq 1 ]; then
    "${engine_cmd[@]}" image prune -f >/dev/null
fi
