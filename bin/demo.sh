#!/usr/bin/env bash
# The whole job on a small synthetic volume, from a fresh clone, in one command:
#
#   bash bin/demo.sh [WORKDIR]            (default WORKDIR: ./demo)
#
# With Nextflow and Docker or Podman on the machine it runs the pipeline itself
# (nextflow run main.nf -profile test,<engine>); otherwise it runs the pipeline's own stages in
# order with this project's scripts: it makes .venv if missing (pip install -e ".[all,tf]"), finds
# the model, writes a synthetic volume, plans the blocks, computes the scaling factor, creates the
# output, segments the blocks in parallel (up to the cores), labels the neurons as objects across
# blocks (object table), and draws a quick-look picture. It prints where the results are.
#
# The model: EXLLSM_MODEL=/path/to/neuron_2021.h5, else ../shared/models/neuron_2021.h5, else
# ~/.cache/exllsm-neuronseg/neuron_2021.h5, else it is downloaded from the original tool's
# repository there; every one is checked against the published sha256 first.
# EXLLSM_DEMO_ENGINE=stages forces the stage-by-stage run even where Nextflow is installed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mkdir -p "${1:-demo}" && cd "${1:-demo}" && pwd)"
sha="104d2eb50b3233d9dc226ae2a5efb9c45a4d42df5075bed74eb16c2410b0622a"
url="https://github.com/JaneliaSciComp/exllsm-neuron-segmentation/raw/master/neuron_2021.h5"
say() { printf '\n== %s\n' "$*" >&2; }

# ---- the model, checksum-verified -------------------------------------------------------------
checked() { [[ -f "$1" ]] && [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$sha" ]]; }
model=""
for candidate in "${EXLLSM_MODEL:-}" "$root/../shared/models/neuron_2021.h5" "$HOME/.cache/exllsm-neuronseg/neuron_2021.h5"; do
    if [[ -n "$candidate" ]] && checked "$candidate"; then model="$(cd "$(dirname "$candidate")" && pwd)/$(basename "$candidate")"; break; fi
    if [[ -n "$candidate" && -f "$candidate" ]]; then echo "warning: $candidate is not the published model (sha256 differs); skipped" >&2; fi
done
if [[ -z "$model" ]]; then
    model="$HOME/.cache/exllsm-neuronseg/neuron_2021.h5"
    say "downloading the published model to $model"
    mkdir -p "$(dirname "$model")"
    if ! curl -fsSL -o "$model.partial" "$url" || ! checked "$model.partial"; then
        rm -f "$model.partial"
        echo "error: could not download the model from $url (or its sha256 differs); download it yourself and set EXLLSM_MODEL=/path/to/neuron_2021.h5" >&2
        exit 2
    fi
    mv "$model.partial" "$model"
fi

# ---- Nextflow, where it is installed ------------------------------------------------------------
if [[ "${EXLLSM_DEMO_ENGINE:-}" != "stages" ]] && command -v nextflow >/dev/null; then
    engine=""
    for e in docker podman; do command -v "$e" >/dev/null && { engine="$e"; break; }; done
    if [[ -n "$engine" ]]; then
        say "nextflow run main.nf -profile test,$engine (results in $work/results)"
        cd "$work"
        nextflow run "$root/main.nf" -profile "test,$engine" --neuron_model "$model" --outdir "$work/results"
        echo "results: $work/results (quick-look pictures in $work/results/quicklook)"
        exit 0
    fi
fi

# ---- the project's environment -------------------------------------------------------------------
if [[ ! -x "$root/.venv/bin/python" ]] || ! "$root/.venv/bin/python" -c "import exllsm_neuronseg, tensorflow, scipy, matplotlib" 2>/dev/null; then
    say "setting up $root/.venv (pip install -e \".[all,tf]\", about a minute)"
    [[ -x "$root/.venv/bin/python" ]] || python3 -m venv "$root/.venv"
    "$root/.venv/bin/pip" install -q --upgrade pip
    "$root/.venv/bin/pip" install -q -c "$root/containers/constraints.txt" -e "$root[all,tf]"
fi
export PATH="$root/.venv/bin:$root/bin:$PATH"
py() { "$root/.venv/bin/python" "$root/bin/$1" "${@:2}"; }
cores="$(nproc 2>/dev/null || echo 2)"

# ---- the stages, in the pipeline's order ---------------------------------------------------------
raw="$work/input.n5"
out="$work/result.n5"
say "a synthetic volume: $raw:/c1/s0 (256x256x128, neurites and puncta)"
py make_test_volume.py -o "$raw" -d /c1/s0 --shape 256,256,128 --chunks 64,64,64 --seed 1

say "the blocks (blocks.txt) and the scaling jobs"
py plan_blocks.py -i "$raw" -id /c1/s0 --partition_size 128 -o "$work/blocks.txt" --scaling_output "$work/scaling_jobs.txt"

say "the scaling factor (half of the 128^3 tiles)"
scaling="$(py scaling_factor.py -i "$raw" -id /c1/s0 -p 0.5 --partition_size 128,128,128 --seed 1 | tail -n 1 | cut -d' ' -f6)"
echo "scaling factor: $scaling"

say "the output dataset, then the blocks, $cores at a time"
py create_volume.py -i "$raw" -id /c1/s0 -o "$out" -od /segmented/s0
n_blocks="$(grep -c . "$work/blocks.txt")"
seq 0 $((n_blocks - 1)) | xargs -P "$cores" -I{} "$root/.venv/bin/python" "$root/bin/segment_volume.py" \
    -i "$raw" -id /c1/s0 -o "$out" -od /segmented/s0 -m "$model" -s "$scaling" \
    --blocks "$work/blocks.txt" --block-index {} --no-progress

say "neurons as objects: connected components across the blocks (threshold 0.8, 26-connected, >= 200 voxels)"
records="$work/records"
seq 0 $((n_blocks - 1)) | xargs -P "$cores" -I{} "$root/.venv/bin/python" "$root/bin/label_blocks.py" \
    -i "$out" -id /segmented/s0 --records "$records" --blocks "$work/blocks.txt" --block-index {}
py merge_labels.py -i "$out" -id /segmented/s0 --blocks "$work/blocks.txt" --records "$records" --min-size 200 --objects "$work/objects.csv"
py create_volume.py -i "$out" -id /segmented/s0 -o "$out" -od /connected/s0 --dtype uint64 --chunks 64,64,64
py write_labels.py -i "$out" -id /segmented/s0 --records "$records" -o "$out" -od /connected/s0 --blocks "$work/blocks.txt"

say "quick-look pictures"
py quicklook.py -i "$raw" -id /c1/s0 --result "$out:/segmented/s0" -o "$work/segmented.png" --no-progress
py quicklook.py -i "$raw" -id /c1/s0 --result "$out:/connected/s0" -o "$work/connected.png" --no-progress

cat >&2 <<EOF

== done
input          $raw:/c1/s0
probabilities  $out:/segmented/s0
neurons        $out:/connected/s0 (uint64 labels), table $work/objects.csv
pictures       $work/segmented.png, $work/connected.png
how it was made: $root/.venv/bin/python $root/bin/provenance.py -i $out -id /segmented/s0
EOF
