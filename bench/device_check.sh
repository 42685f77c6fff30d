#!/usr/bin/env bash
# The one-shot accelerator check: bench/device_check.py's figures in OUTDIR/device_check.json, with nvidia-smi
# and the whole log beside it.
#
#   bash bench/device_check.sh OUTDIR                           # on the GPU machine (~8 min on one H200, estimated)
#   JAX_PLATFORMS=cpu bash bench/device_check.sh --smoke OUTDIR # tiny sizes: debug it on a CPU first
#   bash bench/device_check.sh OUTDIR --batches 64 --curve_steps 30  # a shorter window: fewer sizes
#
# The GPU image has jax (CUDA), flax, optax, orbax, torch and torchvision but no ml_collections and no package
# registry: where ml_collections does not import, the wheels in .whl/ (carried with the working tree; see
# bench/NOTES.md) are installed into a scratch site directory first. PYTHON selects the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=()
if [ "${1:-}" = "--smoke" ]; then smoke=(--smoke); shift; fi
out="${1:?usage: bash bench/device_check.sh [--smoke] OUTDIR}"
py="${PYTHON:-python3}"
mkdir -p "$out"
if ! "$py" -c "import ml_collections" 2>/dev/null; then
  compgen -G ".whl/*.whl" > /dev/null || { echo "ml_collections is missing and .whl/ holds no wheels" >&2; exit 1; }
  site="$(mktemp -d)"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# JAX and torch run one after the other in their own processes: neither may hold the GPU's memory for the other.
export XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
# One compilation cache for the run: the loss curves' steps are the timed steps' programs, and the JAX worker
# builds a fresh optimizer for each, so only the persistent cache can hand them over.
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  export JAX_COMPILATION_CACHE_DIR="$(mktemp -d)"
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi
{ nvidia-smi || echo "nvidia-smi: not available on this machine"; } > "$out/nvidia-smi.txt" 2>&1
"$py" -m bench.device_check "$out" "${smoke[@]}" "${@:2}" 2>&1 | tee "$out/device_check.log"
