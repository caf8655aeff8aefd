#!/usr/bin/env bash
# Every GPU figure and GPU test the open issues ask for, in one run on a CUDA machine:
#   synthesis engine (issue 3): the CUDA parity test and bench/synthesis.py, bench/vqgan.py, bench/diffusion.py
#                               on the GPU;
#   speed (issue 19):           bench/unet_attention.py (each attention variant on the GPU: the fused
#                               scaled_dot_product_attention path is chosen on CUDA), the DPM-Solver++ mid/late
#                               tumour in bench/synthesis.py (mid_late_dpm_s) and its sample in bench/diffusion.py;
#   stage 3 (issue 8):          bench/segmentation_pipeline.py with the diffusion synthesis on the GPU in
#                               8 DataLoader workers ("is synthesis the bottleneck of a GPU training step?").
#
#   bash bench/gpu_check.sh OUTDIR
#
# Each step has its own time limit (at most 9.5 minutes together) and writes OUTDIR/<step>.json (the benchmark's
# JSON line) or OUTDIR/<step>.txt, with its log in OUTDIR/<step>.log; a failing step does not stop the others,
# and the exit status is the number of failed steps. Needs python3 (or $PYTHON) with a CUDA build of torch and
# the project's dependencies importable (monai, SimpleITK, nibabel, einops, pandas, pyyaml, tqdm, scipy,
# matplotlib): on a machine without internet, put wheels made by scripts/download_wheels.sh into a folder and
# set WHEELS to it. The parity test reads reference/parity from the shared folder (DIFFTUMOR_SHARED, default
# ../shared); without it the test is skipped and parity.txt says so. Sizes, where uploads are limited: the
# parity files are 54 MB, the SimpleITK wheel 53 MB, monai + nibabel 5 MB, this repository 3 MB; the parity
# step needs no SimpleITK, so STEPS=parity and the other steps can travel separately.
# Environment: STEPS (default "env parity synthesis vqgan diffusion attention segmentation"), DEVICE (default cuda; cpu
# makes a smoke run of the same steps), QUICK=1 (one repeat each, for smoke runs), PYTHON, WHEELS.
set -u
out=${1:?usage: bash bench/gpu_check.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
py=${PYTHON:-python3}
dev=${DEVICE:-cuda}
steps=${STEPS:-env parity synthesis vqgan diffusion attention segmentation}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${WHEELS:-}" ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/difftumor-site "$WHEELS"/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/difftumor-site" || echo "gpu_check: installing $WHEELS/*.whl failed" >&2
fi
if [ "${QUICK:-0}" = 1 ]; then r=1; rm_=1; rd=0; b=2; small="--network unet --tiny --roi 48"; else r=5; rm_=3; rd=3; b=8; small=""; fi

failed=0
step() {  # step NAME SECONDS OUTFILE COMMAND...
    local name=$1 limit=$2 target=$3; shift 3
    case " $steps " in *" $name "*) ;; *) return 0 ;; esac
    local t0=$SECONDS
    if timeout "$limit" "$@" >"$out/$target" 2>"$out/$name.log"; then
        echo "gpu_check: $name done in $((SECONDS - t0)) s -> $out/$target"
    else
        echo "gpu_check: $name FAILED (exit $?, after $((SECONDS - t0)) s; see $out/$name.log)"
        failed=$((failed + 1))
    fi
}

step env 30 env.txt bash -c "nvidia-smi || true; \"$py\" -c 'import torch, monai, SimpleITK; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\"); print(\"monai\", monai.__version__, \"SimpleITK\", SimpleITK.Version_VersionString())'"
step parity 110 parity.txt "$py" -m pytest tests/backend/test_engine.py -m gpu -rs -q -p no:cacheprovider
step synthesis 150 synthesis.json "$py" bench/synthesis.py --device "$dev" --repeats "$r" --repeats-mid "$rm_" --json
step vqgan 60 vqgan.json "$py" bench/vqgan.py --device "$dev" --repeats "$((r * 2))" --json
step diffusion 60 diffusion.json "$py" bench/diffusion.py --device "$dev" --repeats "$((r * 4))" --ddim-repeats "$rd" --json
step attention 40 attention.json "$py" bench/unet_attention.py --device "$dev" --repeats "$((r * 3))" --json
step segmentation 120 segmentation.json "$py" bench/segmentation_pipeline.py --device "$dev" --synthesis-device "$dev" \
    --workers "$b" --batches "$b" --steps "$b" $small --json
echo "gpu_check: $failed failed step(s); results in $out"
exit "$failed"
