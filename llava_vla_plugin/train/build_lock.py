"""Build DeepSpeed's JIT optimizer op before the model loads, and stop on a stale build lock instead of hanging.

Why: DeepSpeed's `FusedAdam` (and `DeepSpeedCPUAdam` under optimizer offload) is compiled on first use by
torch's JIT extension loader, once per machine and torch/DeepSpeed version (2-6 minutes; the CPU op took
366 s on a busy 2-core host, the CUDA op is built the same way). torch serialises that build with a bare file:

- torch/utils/cpp_extension.py:1935 `load()` picks the build folder with `_get_build_directory()`
  (:2789, `$TORCH_EXTENSIONS_DIR/<op>` or `~/.cache/torch_extensions/py311_<cpu|cuXXX>/<op>`);
- :2345 `_jit_compile` takes `FileBaton(<folder>/lock)`; the builder removes it in a `finally` (:2398),
  every other process calls `baton.wait()` (:2400);
- torch/utils/file_baton.py:34 creates the lock with `os.open(O_CREAT | O_EXCL)` and writes no owner;
  :49 `wait()` polls `os.path.exists` with no timeout and no message.

A builder killed by a signal (SIGTERM from a launcher or `timeout`, SIGKILL, a preempted node) never reaches
the `finally`, so the file stays and every later DeepSpeed run on the machine waits forever at 1 % CPU.

What this module does, in every rank before upstream's train() (train.py):
1. From the DeepSpeed config it predicts the op DeepSpeed will build (as deepspeed/runtime/engine.py
   `get_optimizer_configuration` decides): none for a non-Adam optimizer, for `torch_adam`, for a
   pre-built op or without an `optimizer` section (then transformers creates torch's AdamW).
2. It loads that op itself under our own `fcntl.flock` on `<folder>/vla_build.flock`. The kernel drops an
   flock when its holder dies, even by SIGKILL, so holding it proves that no run of this project is
   building the op; ranks and runs that find it held wait for the build (one message) instead of guessing.
3. Holding the flock, a torch `lock` that still exists is a foreign build or a stale file. torch's builder
   keeps the lock's fd open for the whole build (file_baton.py:34, closed at :61), so a live build on this
   host shows up as a /proc/<pid>/fd link to the file: then we wait for it. None: the lock is stale, and the
   run stops (exit 2) naming the file and the `rm` that frees it; removing it ourselves could break a build
   on another host that shares the folder, which no check here can see.
4. The loaded op stays in DeepSpeed's per-process cache (`OpBuilder._loaded_ops`), so DeepSpeed's own
   `FusedAdam()` later neither builds nor touches the lock.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time

log = logging.getLogger(__name__)

GUARD_NAME = "vla_build.flock"
LOCK_NAME = "lock"  # torch/utils/cpp_extension.py:2345
LIVE_BUILD_POLL_S = 2.0


class StaleBuildLockError(RuntimeError):
    """A torch extension `lock` whose builder is gone: every DeepSpeed run would wait on it forever."""


def predicted_op_builders(ds_config: dict) -> list[str]:
    """DeepSpeed op builders the config makes DeepSpeed JIT-load when the optimizer is created."""
    optimizer = ds_config.get("optimizer") or {}
    if str(optimizer.get("type", "")).lower() not in ("adam", "adamw"):
        return []
    if (optimizer.get("params") or {}).get("torch_adam"):
        return []
    zero = ds_config.get("zero_optimization") or {}
    offload = str((zero.get("offload_optimizer") or {}).get("device", "none")).lower()
    if int(zero.get("stage", 0) or 0) > 0 and offload in ("cpu", "nvme"):
        return ["CPUAdamBuilder"]
    return ["FusedAdamBuilder"]


def read_ds_config(value: str) -> dict | None:
    """`--deepspeed` takes a path or a JSON string (transformers' HfDeepSpeedConfig); None when neither."""
    try:
        if os.path.isfile(value):
            with open(value) as f:
                return json.load(f)
        return json.loads(value)
    except (OSError, ValueError):
        return None


def prepare_deepspeed_ops(argv: list[str]) -> None:
    """Load the op a `--deepspeed` run will need (building it if needed); raise StaleBuildLockError on a stale lock."""
    if "--deepspeed" not in argv or argv.index("--deepspeed") + 1 >= len(argv):
        return
    config = read_ds_config(argv[argv.index("--deepspeed") + 1])
    if config is None:
        return  # transformers reports an unreadable config itself
    for name in predicted_op_builders(config):
        load_op(name)


def load_op(builder_name: str):
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops

    builder = get_accelerator().create_op_builder(builder_name)
    if builder is None or (installed_ops.get(builder.name, False) and accelerator_name == get_accelerator()._name):
        return builder.load() if builder is not None else None  # pre-built at install: no JIT, no lock
    from torch.utils.cpp_extension import _get_build_directory

    folder = _get_build_directory(builder.name, verbose=False)
    with _Guard(os.path.join(folder, GUARD_NAME), builder.name) as guard:
        check_lock(os.path.join(folder, LOCK_NAME), builder.name, guarded=guard.locked)
        first = not any(f.startswith(builder.name) and f.endswith(".so") for f in os.listdir(folder))
        if first:
            log.warning("building DeepSpeed's %s op in %s: once per machine and torch/DeepSpeed version, "
                        "takes minutes (later runs load it in seconds)", builder.name, folder)
        start = time.monotonic()
        op = builder.load(verbose=False)
        if first:
            log.warning("DeepSpeed's %s op built in %.0f s", builder.name, time.monotonic() - start)
        return op


def check_lock(lock: str, op: str, guarded: bool = True) -> None:
    """Return when `lock` is absent (waiting while a live build on this host holds it); raise when stale.

    `guarded`: the caller holds the project's flock, so no run of ours is building; without it (a file system
    without flock) a lock nobody on this host holds may be a build on another host, so it is only reported."""
    waited = False
    while os.path.exists(lock):
        holders = lock_holders(lock)
        if holders:
            if not waited:
                log.warning("waiting for the build of DeepSpeed's %s op by pid %s on this host (%s)",
                            op, ", ".join(map(str, holders)), lock)
                waited = True
            time.sleep(LIVE_BUILD_POLL_S)
            continue
        try:
            created = os.stat(lock).st_mtime
        except FileNotFoundError:
            return  # released between the two checks
        message = stale_lock_message(lock, op, created, guarded)
        if guarded:
            raise StaleBuildLockError(message)
        log.warning(message)
        return


def stale_lock_message(lock: str, op: str, created: float, guarded: bool) -> str:
    age = max(0.0, time.time() - created)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))
    ours = "and no run of this project is building the op" if guarded else \
        "(this file system has no flock, so a build on another host cannot be ruled out)"
    return (f"{lock} is left from an interrupted build of DeepSpeed's {op} op (created {when}, "
            f"{_age(age)} ago; no process on {socket.gethostname()} holds it {ours}). torch waits on this "
            f"file forever (torch/utils/file_baton.py FileBaton.wait), so every DeepSpeed run would hang there. "
            f"It is safe to delete when no other build of the op runs, including on hosts that share "
            f"{os.path.dirname(os.path.dirname(lock))}:\n    rm {lock}\nthen rerun (an unfinished op is built again, which takes minutes once).")


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def lock_holders(path: str) -> list[int]:
    """Pids on this host with `path` open (torch's builder keeps its lock fd open, file_baton.py:34-61)."""
    target = os.path.realpath(path)
    holders = []
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return holders
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or another user's process
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    holders.append(int(pid))
                    break
            except OSError:
                continue
    return holders


class _Guard:
    """An exclusive flock on `path` for the build; waits (with one message) while another process holds it."""

    def __init__(self, path: str, op: str):
        self.path, self.op, self.fd, self.locked = path, op, None, False

    def __enter__(self) -> "_Guard":
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
                log.warning("waiting for %s, which is building DeepSpeed's %s op (%s)", owner, self.op, self.path)
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            self.locked = True
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            log.warning("cannot flock %s (%s): runs that share this folder are not serialised here", self.path, e)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # drops the flock


def main_check(argv: list[str]) -> None:
    """train.py's entry: exit 2 with the message on a stale lock (before any weight is loaded)."""
    try:
        prepare_deepspeed_ops(argv)
    except StaleBuildLockError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
