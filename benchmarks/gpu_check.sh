#!/usr/bin/env bash
# The GPU half of minixcept, proven and timed in one command (see benchmarks/gpu_check.py):
#
#   benchmarks/gpu_check.sh [OUT.json] [--photos DIR] [--weights FILE] [--dry]
#
# On a machine with CuPy, PyTorch (cuDNN), h5py and Pillow - no TensorFlow, no network - it
# runs the CuPy test suite, compares GPU features with NumPy's on real photos, times
# minixcept against the same network in PyTorch and measures the hardware's floor, in
# under 8 minutes, and writes everything to OUT.json (default gpu_check.json).
# --dry runs the same code on NumPy at tiny sizes, as CI does.
set -euo pipefail
cd "$(dirname "$0")/.."
out=gpu_check.json
if [[ $# -gt 0 && $1 != --* ]]; then out=$1; shift; fi
export CUPY_TF32=0                # float32 stays float32 in CuPy's matrix products
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py --out "$out" "$@"
