"""Run the commands a demo prints under `next`, verbatim, as a user would paste them (tests/test_demo.py,
tests/test_closed_loop.py).

A user's shell has none of what the test session or the demo itself sets: no HF_HOME pointing at the
tiny model, no HF_HUB_OFFLINE, no MUJOCO_GL, no launcher variables. `user_env` takes those away, so a
printed command that needs one must say so itself. Kept: PATH (the environment is not activated: the
printed commands name their interpreter) and PYTHONPATH = this checkout (in a developer's worktree the
shared venv's editable install may point at another checkout; in CI it is this same clone).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

from conftest import ROOT

SESSION_ONLY = ("HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "TRANSFORMERS_CACHE",
                "MUJOCO_GL", "PYOPENGL_PLATFORM", "VLA_PYTHON", "USE_TF", "VIRTUAL_ENV")


def launcher_vars() -> set[str]:
    return set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):-", (ROOT / "scripts" / "finetune_ov_vla.sh").read_text()))


def user_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    drop = set(SESSION_ONLY) | launcher_vars()
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def next_commands(stdout: str) -> list[tuple[str, str]]:
    """(description, command) for every command of the `next` block (demo.print_next's layout: a
    description line indented 2 spaces, its command on the next line indented 4)."""
    lines = stdout[stdout.rindex("\nnext"):].splitlines()[2:]
    found = []
    for previous, line in zip(lines, lines[1:]):
        if line.startswith("    ") and not line.startswith("     "):
            assert previous.startswith("  ") and previous.rstrip().endswith(":"), (previous, line)
            found.append((previous.strip().rstrip(":"), line.strip()))
    return found


def run_verbatim(command: str, cwd: Path, env: dict[str, str], log: Path, timeout: float = 900) -> str:
    """Run to completion through bash; assert exit 0; return the output."""
    started = time.monotonic()
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    with log.open("a") as f:
        f.write(f"\n$ {command}\n[exit {proc.returncode}, {time.monotonic() - started:.1f} s]\n{out}")
    assert proc.returncode == 0, f"printed command failed (exit {proc.returncode}) in {cwd}:\n$ {command}\n{out[-4000:]}"
    return out


class Started:
    """A long-running printed command (a server, a training run), started through bash in its own process group."""

    def __init__(self, command: str, cwd: Path, env: dict[str, str], log: Path):
        self.command, self.log = command, log
        self._out = log.open("a")
        self._out.write(f"\n$ {command}\n")
        self._out.flush()
        self.proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, ready: Callable[[], bool], what: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"printed command exited {self.proc.returncode} before {what}:\n$ {self.command}\n"
                                     f"{self.log.read_text()[-4000:]}")
            time.sleep(0.5)
        raise AssertionError(f"no {what} within {timeout:.0f} s:\n$ {self.command}\n{self.log.read_text()[-4000:]}")

    def stop(self) -> int:
        """SIGTERM to the whole group (bash and what it started), SIGKILL after 60 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()
        return self.proc.returncode

    def __enter__(self) -> "Started":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
