#!/usr/bin/env bash
# Run the one-shot GPU check (bench/gpu_check.py, then bench/gpu_heads.py) on the borrowed GPU machine (Python 3.12, its own torch, no network),
# from the repository root, after `bash bench/prepare_gpu_carry.sh` here put the pinned wheels and
# upstream's patched llava/ source into .gpu_carry/ (carried along; git-ignored):
#     bash bench/gpu_check.sh [--batch-size 8 ...]          (arguments go to bench/gpu_check.py)
# Why --target and PYTHONPATH: the project's requires-python (<3.12) blocks `pip install -e` there,
# and the machine's transformers 5.x must be shadowed by the pinned 4.57.6 that upstream needs.
set -euo pipefail
CARRY=${CARRY:-.gpu_carry}
SITE=${SITE:-/tmp/site}
PY=${PY:-python3}
if ! ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
  echo "error: no wheels in $CARRY/wheels: run 'bash bench/prepare_gpu_carry.sh' on a machine with PyPI access first" >&2
  exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$CARRY"/wheels/*.whl
export PYTHONPATH="$SITE:$PWD:$PWD/$CARRY/llava_src${PYTHONPATH:+:$PYTHONPATH}"
export USE_TF=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$PY" bench/gpu_check.py "$@"
# then the representation benchmark (issue 23: four representations, prefill / decode, restricted vs full LM
# head) with the same install and model shape; --tiny carries over (a CPU rehearsal of both)
heads=()
for a in "$@"; do [ "$a" = "--tiny" ] && heads+=(--tiny); done
exec "$PY" bench/gpu_heads.py "${heads[@]}"
