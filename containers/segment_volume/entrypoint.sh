#!/bin/bash
# The host pipeline's entry point: /entrypoint.sh <original script name> ARGS...
# volumeSegmentation and volumeScalingFactor take the original scripts' flags unchanged.
set -euo pipefail

if [ $# -eq 0 ]; then
    echo "usage: /entrypoint.sh volumeSegmentation|volumeScalingFactor ARGS..." >&2
    exit 2
fi
name=$1
shift
case "$name" in
    volumeSegmentation|segment_volume|segment_volume.py) exec segment_volume.py "$@" ;;
    volumeScalingFactor|scaling_factor|scaling_factor.py) exec scaling_factor.py "$@" ;;
    *)
        echo "error: unknown script '$name': use volumeSegmentation or volumeScalingFactor" >&2
        exit 2
        ;;
esac
