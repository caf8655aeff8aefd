#!/usr/bin/env bash
# Wheels of the runtime dependencies that a CUDA machine without internet usually lacks, for
# bench/gpu_check.sh (WHEELS=DIR there):
#
#   bash scripts/download_wheels.sh DIR [PYTHON_VERSION]     (default 3.12; Linux x86-64, manylinux)
#
# torch (a CUDA build), numpy, scipy, pandas, matplotlib, einops, pyyaml and tqdm are expected on such a
# machine already; this fetches the versions this project is tested with of monai, SimpleITK and nibabel
# (no dependencies: all of theirs are in the list above).
set -euo pipefail
dir=${1:?usage: bash scripts/download_wheels.sh DIR [PYTHON_VERSION]}
pyver=${2:-3.12}
mkdir -p "$dir"
plats=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    plats+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    "${plats[@]}" -d "$dir" monai==1.6.1 SimpleITK==2.5.7 nibabel==5.4.2
ls -1 "$dir"
