#!/usr/bin/env bash
# One environment for data tools and training: .venv with the pinned stack, this project
# editable, and upstream LLaVA-NeXT at the pinned commit with patches/ applied.
# Idempotent: every stage writes a stamp keyed by its inputs and is skipped when the stamp matches.
#
#   LLAVA_NEXT_SRC    local checkout, git mirror or git URL of LLaVA-NeXT (default: GitHub)
#   REQUIRE_UPSTREAM  1 = fail when upstream cannot be had (default: warn, exit 0)
#   PYTHON            interpreter for the venv (default python3.11)
#   VENV              venv folder (default .venv)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
LLAVA_NEXT_SRC=${LLAVA_NEXT_SRC:-https://github.com/LLaVA-VL/LLaVA-NeXT.git}
REQUIRE_UPSTREAM=${REQUIRE_UPSTREAM:-0}
UPSTREAM_COMMIT=df179663ae8b83207df100a1f7af24caec633ff9
UPSTREAM_DIR=$ROOT/.upstream/LLaVA-NeXT
MODE=${1:-all}

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

hash_of() { cat "$@" | sha256sum | cut -c1-16; }
LOG=$ROOT/.upstream/setup.log
mkdir -p "$ROOT/.upstream"
# pip's own chatter goes to the log; on failure its tail is shown.
pip_q() {
  if ! "$VENV/bin/python" -m pip install -q "$@" >>"$LOG" 2>&1; then
    grep -v '^WARNING: Location' "$LOG" | tail -30 >&2
    die "pip install $* failed (full log: $LOG)"
  fi
}

changed=0

# ---- 1. virtualenv + pinned dependencies + this project (editable) -------------------------
if [ "$MODE" != "--upstream-only" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install Python 3.11 or set PYTHON=/path/to/python3.11"
    say "creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
    changed=1
  fi
  deps_stamp="$VENV/.vla-deps-$(hash_of constraints.txt pyproject.toml)"
  if [ ! -f "$deps_stamp" ]; then
    say "installing pinned dependencies (constraints.txt) and this project (editable)"
    pip_q --upgrade "pip>=24" setuptools wheel
    # torch first, alone: on CPU hosts pip takes the local CPU wheel where one is provided.
    pip_q -c constraints.txt torch
    pip_q -c constraints.txt -e '.[test]'
    rm -f "$VENV"/.vla-deps-*
    touch "$deps_stamp"
    changed=1
  fi
  # Closed-loop evaluation renders MuJoCo offscreen through EGL (MUJOCO_GL=egl): on CPU hosts that
  # is Mesa's software EGL. Training and the data tools do not need it, so a miss is a warning that
  # names the packages; the simulator tests then fail with an error naming MUJOCO_GL.
  if ! /sbin/ldconfig -p 2>/dev/null | grep -qE 'libEGL\.so\.1|libEGL_mesa\.so|libEGL_nvidia\.so'; then
    say "warning: no EGL library found: closed-loop evaluation (robosuite/MuJoCo, MUJOCO_GL=egl) cannot render."
    say "         Debian/Ubuntu: sudo apt-get install libegl1 libegl-mesa0   (GPU hosts: the NVIDIA driver's EGL)"
  elif ! PYTHONPATH="$ROOT" "$VENV/bin/python" -m llava_vla_plugin.apps.sim_lift --check-render >>"$LOG" 2>&1; then
    say "warning: MuJoCo cannot render offscreen with MUJOCO_GL=egl (see $LOG); install libegl1 libegl-mesa0"
  fi
  if [ "$MODE" = "--gpu" ]; then
    if command -v nvcc >/dev/null && "$VENV/bin/python" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
      if ! "$VENV/bin/python" -c 'import flash_attn' 2>/dev/null; then
        say "building flash-attn (CUDA host)"
        pip_q flash-attn --no-build-isolation
        changed=1
      fi
    else
      say "no CUDA here: flash-attn skipped; training uses attn_implementation=sdpa"
    fi
    exit 0
  fi
fi

# ---- 2. upstream LLaVA-NeXT at the pinned commit, patched, installed --no-deps -------------
patches_hash=$(cat "$ROOT"/patches/*.patch 2>/dev/null | sha256sum | cut -c1-16)
up_stamp="$ROOT/.upstream/.installed-${UPSTREAM_COMMIT:0:7}-$patches_hash"

how_to_provide() {
  cat <<EOF
[setup] Upstream LLaVA-NeXT is not installed: training, inference and the tests that need it are
[setup] skipped; the data tools (data_tools download/convert/validate) work without it.
[setup] To provide it offline, point LLAVA_NEXT_SRC at a local checkout or git mirror that holds
[setup] commit ${UPSTREAM_COMMIT:0:7} and run setup again:
[setup]     git clone <mirror-or-bundle> /opt/LLaVA-NeXT      # on a machine with access, then copy it
[setup]     LLAVA_NEXT_SRC=/opt/LLaVA-NeXT make setup
EOF
}

upstream_missing() {
  say "$1"
  how_to_provide
  if [ "$REQUIRE_UPSTREAM" = "1" ]; then die "REQUIRE_UPSTREAM=1 and upstream LLaVA-NeXT could not be installed"; fi
  exit 0
}

if [ -f "$up_stamp" ] && "$VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("llava") else 1)' 2>/dev/null; then
  if [ "$changed" = 0 ]; then
    say "nothing to do: .venv, dependencies and upstream LLaVA-NeXT ${UPSTREAM_COMMIT:0:7} (+$(ls patches/*.patch | wc -l) patches) are up to date"
  else
    say "upstream LLaVA-NeXT ${UPSTREAM_COMMIT:0:7} already installed"
  fi
  exit 0
fi

say "fetching upstream LLaVA-NeXT ${UPSTREAM_COMMIT:0:7} from $LLAVA_NEXT_SRC"
rm -rf "$UPSTREAM_DIR.tmp"
if [ -d "$LLAVA_NEXT_SRC" ] && [ ! -d "$LLAVA_NEXT_SRC/.git" ] && [ ! -f "$LLAVA_NEXT_SRC/HEAD" ]; then
  upstream_missing "LLAVA_NEXT_SRC=$LLAVA_NEXT_SRC is a folder but not a git checkout or mirror (the pinned commit cannot be verified)"
fi
CLONE_SRC=$LLAVA_NEXT_SRC
if [ -f "$LLAVA_NEXT_SRC/HEAD" ] && [ -d "$LLAVA_NEXT_SRC/objects" ] && [ ! -d "$LLAVA_NEXT_SRC/refs" ]; then
  # A bare mirror copied without its (empty) refs/ folder, e.g. a read-only ../shared copy that
  # holds only packed-refs: git does not recognise it as a repository. Clone from a writable copy.
  say "$LLAVA_NEXT_SRC has no refs/ folder (read-only copy?): cloning from a temporary copy"
  rm -rf "$ROOT/.upstream/src.git" && cp -r "$LLAVA_NEXT_SRC" "$ROOT/.upstream/src.git"
  chmod -R u+w "$ROOT/.upstream/src.git" && mkdir -p "$ROOT/.upstream/src.git/refs/heads" "$ROOT/.upstream/src.git/refs/tags"
  CLONE_SRC=$ROOT/.upstream/src.git
fi
if ! GIT_TERMINAL_PROMPT=0 timeout 600 git clone -q --no-checkout "$CLONE_SRC" "$UPSTREAM_DIR.tmp" 2>"$ROOT/.upstream/clone.log"; then
  upstream_missing "could not clone $LLAVA_NEXT_SRC ($(tail -1 "$ROOT/.upstream/clone.log"))"
fi
if ! git -C "$UPSTREAM_DIR.tmp" -c advice.detachedHead=false checkout -q "$UPSTREAM_COMMIT" 2>/dev/null; then
  found=$(git -C "$UPSTREAM_DIR.tmp" rev-parse --short HEAD 2>/dev/null || echo none)
  rm -rf "$UPSTREAM_DIR.tmp"
  upstream_missing "$LLAVA_NEXT_SRC does not contain the pinned commit ${UPSTREAM_COMMIT:0:7} (its HEAD is $found); fetch that commit into it"
fi
for p in "$ROOT"/patches/*.patch; do
  [ -e "$p" ] || continue
  if ! git -C "$UPSTREAM_DIR.tmp" apply --check "$p" 2>"$ROOT/.upstream/patch.log"; then
    found=$(git -C "$UPSTREAM_DIR.tmp" rev-parse --short HEAD)
    die "patch $(basename "$p") does not apply to upstream commit $found (pinned ${UPSTREAM_COMMIT:0:7}):
$(cat "$ROOT/.upstream/patch.log")
  What to do: use LLAVA_NEXT_SRC at commit ${UPSTREAM_COMMIT:0:7}; if you changed the pin, refresh the patch
  (apply it by hand in .upstream/LLaVA-NeXT.tmp, then 'git diff > patches/$(basename "$p")')."
  fi
  git -C "$UPSTREAM_DIR.tmp" apply "$p"
  say "applied $(basename "$p")"
done
rm -rf "$UPSTREAM_DIR"
mv "$UPSTREAM_DIR.tmp" "$UPSTREAM_DIR"
rm -rf "$ROOT/.upstream/src.git"
say "installing upstream LLaVA-NeXT (--no-deps; its dependencies are our pins)"
pip_q --no-deps --no-build-isolation "$UPSTREAM_DIR"
rm -f "$ROOT"/.upstream/.installed-*
touch "$up_stamp"
USE_TF=0 HF_HUB_OFFLINE=1 "$VENV/bin/python" -c 'import llava.train.llava_trainer' >>"$LOG" 2>&1 || say "warning: upstream installed but 'import llava.train.llava_trainer' fails; see 'make test'"
say "done: upstream LLaVA-NeXT ${UPSTREAM_COMMIT:0:7} installed with $(ls patches/*.patch | wc -l) patches"
