"""Serve a checkpoint on loopback and run a vla-eval benchmark against it: the one copy of that sequence.

    with serving(checkpoint_server_args(ckpt, unnorm_key="lift_scripted"), env, log) as port:
        run_logged(vla_eval_command(cfg, port, out, episodes=2, max_steps=60), env, eval_log)

Used by `make eval-demo` (apps/eval_demo.py) and by the study's closed-loop step
(experiments/closed_loop_study.py). The server is `python -m llava_vla_plugin.infer.vla_eval_server` in a child
process on a free 127.0.0.1 port; vla-eval is its CLI (`python -m vla_eval.cli.main run`, the `vla-eval` console
script in this interpreter) with `--server-url` / `--output-dir` overriding the config's address and folder.
Failures raise ClosedLoopRunError naming the log to read.
"""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SERVER_MODULE = "llava_vla_plugin.infer.vla_eval_server"
VLA_EVAL = [sys.executable, "-m", "vla_eval.cli.main"]  # the `vla-eval` console script, in this interpreter
SERVER_START_TIMEOUT_S = 600

__all__ = ["ClosedLoopRunError", "free_port", "wait_port", "checkpoint_server_args", "server_command", "serving",
           "vla_eval_command", "run_logged", "stop"]


class ClosedLoopRunError(RuntimeError):
    """The server or vla-eval failed; the message names the log."""


def free_port() -> int:
    """A port nobody listens on at 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = SERVER_START_TIMEOUT_S) -> None:
    """Block until something listens on 127.0.0.1:port; raise if `proc` exits first or time runs out."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise ClosedLoopRunError(f"the server exited with {proc.returncode}; log {log}:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise ClosedLoopRunError(f"the server did not listen on 127.0.0.1:{port} within {timeout:.0f} s; log {log}")


def checkpoint_server_args(checkpoint: str | Path, unnorm_key: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    """vla_eval_server's options for a checkpoint (without --port, which serving() adds)."""
    args = ["--checkpoint", str(checkpoint)]
    if unnorm_key:
        args += ["--unnorm-key", str(unnorm_key)]
    return args + [str(a) for a in extra]


def server_command(server_args: Sequence[str], port: int | str) -> list[str]:
    return [sys.executable, "-m", SERVER_MODULE, *server_args, "--port", str(port)]


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def serving(server_args: Sequence[str], env: Mapping[str, str], log: Path,
            timeout: float = SERVER_START_TIMEOUT_S) -> Iterator[int]:
    """The vla-eval server on a free loopback port for the duration of the block; yields the port. Its output
    goes to `log`; it is stopped (terminate, then kill) however the block ends."""
    port = free_port()
    with Path(log).open("w") as f:
        proc = subprocess.Popen(server_command(server_args, port), env=dict(env), stdout=f, stderr=subprocess.STDOUT,
                                cwd=ROOT)
    try:
        wait_port(port, proc, Path(log), timeout)
        yield port
    finally:
        stop(proc)


def vla_eval_command(config: str | Path, port: int | str, output_dir: str | Path, *, episodes: int | None = None,
                     max_steps: int | None = None, params: Mapping[str, Any] | None = None, docker: bool = False,
                     extra: Sequence[str] = ()) -> list[str]:
    """`vla-eval run` of `config` against ws://127.0.0.1:PORT into output_dir. episodes sets every benchmark's
    episodes_per_task, max_steps its step limit (the orchestrator's `max_steps` field), params its `params`."""
    cmd = [*VLA_EVAL, "run", "-c", str(config)]
    if not docker:
        cmd.append("--no-docker")
    cmd += ["--server-url", f"ws://127.0.0.1:{port}", "--output-dir", str(output_dir)]
    if episodes is not None:
        cmd += ["--benchmark-field", f"episodes_per_task={episodes}"]
    if max_steps is not None:
        cmd += ["--benchmark-field", f"max_steps={max_steps}"]
    for k, v in (params or {}).items():
        cmd += ["--param", f"{k}={_yaml_scalar(v)}"]
    return cmd + [str(a) for a in extra]


def _yaml_scalar(v: Any) -> str:
    """A --param value as vla-eval reads it (YAML-typed): strings as written, anything else as JSON (YAML's flow
    style: true, 3, [1, 2], {a: 1})."""
    return v if isinstance(v, str) else json.dumps(v)


def run_logged(cmd: Sequence[str], env: Mapping[str, str], log: Path, timeout: float | None = None) -> None:
    """Run `cmd` with its output in `log`; raise ClosedLoopRunError with the log's tail when it fails."""
    with Path(log).open("w") as f:
        try:
            proc = subprocess.run(list(cmd), env=dict(env), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ClosedLoopRunError(f"`{' '.join(map(str, cmd[:5]))} ...` ran past {timeout:.0f} s; log {log}") from None
    if proc.returncode != 0:
        tail = "".join(_tail(log, 100_000).splitlines(keepends=True)[-40:])
        raise ClosedLoopRunError(f"`{' '.join(map(str, cmd[:5]))} ...` failed (exit {proc.returncode}); log {log}:\n{tail}")
