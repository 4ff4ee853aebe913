"""The README's CPU quick-start, then its flow, run as the README writes them: download -> convert ->
validate -> train -> eval -> serve.

The commands are not copied here: they are read from README.md, from the fenced ```bash blocks
between the `readme-quickstart: begin/end` and `readme-flow: begin/end` markers, so when the README
changes this test runs the new commands. Everything runs verbatim through bash, from a temporary
folder outside the clone, in the environment the README's "Work from any folder" block sets up
(`LLAVA_VLA` = the clone, the set-up environment's `bin/` first on PATH), without the developer's
HF_HOME / HF_HUB_OFFLINE / launcher variables. The quick-start block runs first, as one script (as a
user pastes it into one shell); the environment it leaves (its exports: VLA_SOURCE_ROOT, HF_HOME,
HF_HUB_OFFLINE, MODEL, VISION_TOWER, NUM_GPUS) is the environment of every flow command after it.
That is how CI does what it cannot do as a user does: no network (the download reads the
quick-start's RLDS fixtures, real OXE schemas, laid out like gs://gresearch/robotics), no 7B model
and no GPU (the tiny model, one CPU process). Everything else is the launcher's defaults (4 data-loader
workers, anyres_max_9, gradient checkpointing, batch 8, one epoch: 2 steps of the 21 frames, ...).

One override: --port, appended to the serve command (argparse keeps the last value): port 8000 may be
taken on a shared machine.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, requires_upstream

pytestmark = [requires_upstream, pytest.mark.slow]

README = ROOT / "README.md"
BEGIN, END = "<!-- readme-flow: begin", "<!-- readme-flow: end"
QS_BEGIN, QS_END = "<!-- readme-quickstart: begin", "<!-- readme-quickstart: end"
# what a test session or a developer's shell may set and a user's fresh shell has not
SESSION_ONLY = ("HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "VLA_SOURCE_ROOT", "VLA_PYTHON")
# Every variable scripts/finetune_ov_vla.sh reads: none may leak in from the developer's shell.
def launcher_vars() -> set[str]:
    """Every variable scripts/finetune_ov_vla.sh reads (`${NAME:-default}`), so a developer's shell settings
    (RESUME=never, CONFIG=..., ...) cannot leak into the flow: the README's commands run with the defaults."""
    return set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):-", (ROOT / "scripts" / "finetune_ov_vla.sh").read_text()))


LAUNCHER_VARS = launcher_vars()


def bash_blocks(text: str) -> list[str]:
    """The ```bash blocks of a Markdown text, in order."""
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def flow_commands(readme: str) -> list[str]:
    """The commands of the README's flow: one per logical line (`\\` continuations joined), comment-only
    and blank lines dropped; trailing comments stay (bash ignores them)."""
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1, f"README.md needs one {BEGIN!r} ... {END!r} section"
    section = readme[readme.index(BEGIN):readme.index(END)]
    commands: list[str] = []
    for block in bash_blocks(section):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


def quickstart_script(readme: str) -> str:
    """The quick-start block, whole (it runs as one script: its exports must reach the flow)."""
    assert readme.count(QS_BEGIN) == 1 and readme.count(QS_END) == 1, f"README.md needs one {QS_BEGIN!r} ... {QS_END!r}"
    blocks = bash_blocks(readme[readme.index(QS_BEGIN):readme.index(QS_END)])
    assert len(blocks) == 1, blocks
    return blocks[0]


def without_comment(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def test_flow_is_extracted_from_the_readme() -> None:
    """The parts this test relies on are in the README (a rename there must fail here, not pass silently)."""
    readme = README.read_text()
    commands = flow_commands(readme)
    tools = [next((w for w in without_comment(c) if w.startswith(("data_tools.", "llava_vla_plugin.")) or
                   w.endswith("finetune_ov_vla.sh")), None) for c in commands]
    assert {"data_tools.download", "data_tools.convert", "data_tools.validate", "llava_vla_plugin.infer.eval",
            "llava_vla_plugin.infer.serve"} <= set(tools), tools
    assert any(t and t.endswith("finetune_ov_vla.sh") for t in tools)
    setup = next(b for b in bash_blocks(readme) if "export LLAVA_VLA=" in b)
    assert "source .venv/bin/activate" in setup, "the README must say how to activate the environment"
    # relative paths only: the flow must not depend on where the clone or the user is
    assert not any(re.search(r"(?<![\w$])/(?:tmp|home|work|data)\b", c) for c in commands), commands
    # the quick-start says what a CPU user needs: the tiny model, its HF_HOME, NUM_GPUS=0; paths under $PWD
    quick = quickstart_script(readme)
    for needed in ("llava_vla_plugin.apps.tiny_model", "export HF_HOME=$PWD/", "HF_HUB_OFFLINE=1", "NUM_GPUS=0",
                   "MODEL=$PWD/", "VLA_SOURCE_ROOT=$PWD/"):
        assert needed in quick, needed
    assert not re.search(r"(?<![\w$])/(?:tmp|home|work|data)\b", quick), quick


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _json_numpy(array: np.ndarray) -> dict:
    """The json-numpy wire format OpenVLA clients send (json_numpy.patch(); written out, no dependency)."""
    array = np.ascontiguousarray(array)
    return {"__numpy__": base64.b64encode(array.tobytes()).decode("ascii"),
            "dtype": np.lib.format.dtype_to_descr(array.dtype), "shape": list(array.shape)}


def _decode_action(body: object) -> np.ndarray:
    if isinstance(body, str):  # OpenVLA's "encoded" answers are JSON in a string
        body = json.loads(body)
    if isinstance(body, dict) and "__numpy__" in body:
        raw = base64.b64decode(body["__numpy__"])
        return np.frombuffer(raw, dtype=np.lib.format.descr_to_dtype(body["dtype"])).reshape(body["shape"])
    return np.asarray(body, dtype=np.float64)


def _http(url: str, payload: dict | None = None, timeout: float = 120) -> tuple[int, object]:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, json.loads(response.read())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A user's folder outside the clone, after the README's quick-start block ran in it; the environment
    that block left (a user's shell after pasting it)."""
    base = tmp_path_factory.mktemp("readme_flow")
    work = base / "work"
    work.mkdir()
    assert ROOT not in work.resolve().parents, "the flow must run outside the clone"

    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and k not in SESSION_ONLY}
    env.update({
        # the README's "Work from any folder" block: LLAVA_VLA = the clone, the environment activated
        "LLAVA_VLA": str(ROOT),
        "VIRTUAL_ENV": str(Path(sys.executable).parent.parent),
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        # the code under test is this tree (in CI the venv's editable install is this same clone;
        # in a developer's worktree the shared venv may point at another checkout)
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    })
    log, dump = base / "flow.log", base / "quickstart.env"
    script = quickstart_script(README.read_text())
    started = time.monotonic()
    with log.open("w") as out:
        out.write(f"$ (README quick-start)\n{script}\n")
        out.flush()
        proc = subprocess.run(["bash", "-c", f"set -euo pipefail\n{script}\nenv -0 > {shlex.quote(str(dump))}"], cwd=work,
                              env=env, stdout=out, stderr=subprocess.STDOUT, timeout=900)
    assert proc.returncode == 0, f"README quick-start failed (exit {proc.returncode}):\n{log.read_text()[-4000:]}"
    print(f"[{time.monotonic() - started:5.1f} s] README quick-start")
    env = dict(item.split("=", 1) for item in dump.read_text().split("\0") if "=" in item)
    for key in ("_", "SHLVL", "OLDPWD", "PWD"):  # bash's own bookkeeping
        env.pop(key, None)
    bucket = Path(env["VLA_SOURCE_ROOT"])
    assert bucket == work / "bucket" and env["NUM_GPUS"] == "0" and Path(env["HF_HOME"]).is_dir(), env
    return {"work": work, "bucket": bucket, "env": env}


def _run_step(command: str, work: Path, env: dict, log: Path) -> None:
    started = time.monotonic()
    with log.open("a") as out:
        out.write(f"\n$ {command}\n")
        out.flush()
        proc = subprocess.run(["bash", "-c", "set -euo pipefail\n" + command], cwd=work, env=env,
                              stdout=out, stderr=subprocess.STDOUT, timeout=900)
    tail = "".join(log.read_text().splitlines(keepends=True)[-60:])
    assert proc.returncode == 0, f"README command failed (exit {proc.returncode}) in {work}:\n$ {command}\n{tail}"
    print(f"[{time.monotonic() - started:5.1f} s] {command}")


def _serve(command: str, work: Path, env: dict, log: Path) -> None:
    """Start the README's serve command, call /health and /act once, stop it with SIGTERM."""
    port = _free_port()
    # port 8000 may be busy on a shared machine: append --port (argparse keeps the last value)
    args = without_comment(command) + ["--port", str(port)]
    with log.open("a") as out:
        out.write(f"\n$ {shlex.join(args)}\n")
        out.flush()
        proc = subprocess.Popen(["bash", "-c", "exec " + shlex.join(args)], cwd=work, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        base, deadline, health = f"http://127.0.0.1:{port}", time.monotonic() + 300, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status, health = _http(base + "/health", timeout=5)
                if status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        assert proc.poll() is None and health, f"server did not come up:\n{log.read_text()[-4000:]}"
        assert health["status"] == "ok" and "bridge_orig" in health["datasets"], health

        sample = json.loads((work / "converted/bridge_orig/val.jsonl").read_text().splitlines()[0])
        from PIL import Image

        image = np.asarray(Image.open(work / "converted" / sample["image"]).convert("RGB"))
        status, body = _http(base + "/act", {"image": _json_numpy(image), "instruction": "put the cup in the sink",
                                             "unnorm_key": "bridge_orig"})
        action = _decode_action(body)
        assert status == 200 and action.shape == (7,) and np.isfinite(action).all(), body
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"server ignored SIGTERM:\n{log.read_text()[-4000:]}")
    assert code == 0, f"server exit code {code} after SIGTERM:\n{log.read_text()[-4000:]}"


def test_readme_flow_runs_verbatim(workspace: dict) -> None:
    work, env = workspace["work"], workspace["env"]
    repo_run = ROOT / "runs" / "ov-vla"
    repo_run_before = repo_run.exists()
    log = work.parent / "flow.log"  # the quick-start's output is at its top
    commands = flow_commands(README.read_text())
    for command in commands:
        if "llava_vla_plugin.infer.serve" in command:
            _serve(command, work, env, log)
        else:
            _run_step(command, work, env, log)

    # what the flow promised, in the user's folder (relative paths resolved against it)
    manifest = json.loads((work / "data/bridge_orig/1.0.0/download_manifest.json").read_text())
    assert manifest["complete"] and manifest["source"].startswith(str(workspace["bucket"]))
    assert (work / "converted/mixture.yaml").is_file()
    run = work / "runs/ov-vla"
    assert (run / "vla_action_tokenizer.json").is_file() and (run / "dataset_statistics.json").is_file()
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["global_step"] == 2  # one epoch of the quick-start's 21 frames, batch 8
    assert (run / "training_curves.png").stat().st_size > 10_000  # the quick-start says to look at it
    report = json.loads((work / "reports/bridge/report.json").read_text())
    assert report["overall"]["n"] > 0
    # and nothing landed in the clone
    assert repo_run.exists() == repo_run_before, "the launcher wrote runs/ov-vla into the clone"
