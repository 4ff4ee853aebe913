"""An imported dataset trains and serves through the README's path: `vla-import lerobot` -> `vla-validate` ->
the launcher (scripts/finetune_ov_vla.sh, 2 steps on CPU with the tiny model) -> `vla-serve` -> one POST /act.

One importer only: after the converted format every importer shares the code path (data_tools/byod.py), and
the other importers' output is checked against the format by data_tools.validate in their own tests.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, requires_upstream, subprocess_env
from test_readme_flow import _decode_action, _free_port, _http, _json_numpy

pytestmark = [requires_upstream, pytest.mark.slow]
BIN = Path(sys.executable).parent


def test_imported_lerobot_trains_and_serves(tiny_model, tmp_path):
    env = subprocess_env({**tiny_model.env(), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                          "LLAVA_VLA": str(ROOT)})
    run = lambda cmd, **kw: subprocess.run(["bash", "-c", "set -euo pipefail\n" + cmd], cwd=tmp_path, env=env,
                                           capture_output=True, text=True, timeout=900, **kw)
    p = run(f"vla-import lerobot {ROOT}/tests/fixtures/lerobot_v30 --name my_robot --out converted/ --val-fraction 0.34 "
            "--no-progress && vla-validate converted/")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "OK: 18 samples in 1 datasets" in p.stdout
    launcher = {"MODEL": str(tiny_model.llava_dir), "VISION_TOWER": tiny_model.vision_tower, "NUM_GPUS": "0",
                "MAX_STEPS": "2", "BATCH_SIZE": "4", "IMAGE_ASPECT_RATIO": "pad", "MODEL_MAX_LENGTH": "1024",
                "NUM_WORKERS": "0", "OUTPUT_DIR": "runs/my_robot"}
    exports = " ".join(f"{k}={v}" for k, v in launcher.items())
    p = run(f'{exports} DATA=converted/mixture.yaml IMAGE_FOLDER=converted bash "$LLAVA_VLA/scripts/finetune_ov_vla.sh" '
            "--gradient_checkpointing False")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    state = json.loads((tmp_path / "runs/my_robot/trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert set(json.loads((tmp_path / "runs/my_robot/dataset_statistics.json").read_text())) == {"my_robot"}

    port = _free_port()
    server = subprocess.Popen([str(BIN / "vla-serve"), "--checkpoint", "runs/my_robot", "--port", str(port)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base, deadline, health = f"http://127.0.0.1:{port}", time.monotonic() + 300, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                status, health = _http(base + "/health", timeout=5)
                if status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        assert server.poll() is None and health and "my_robot" in health["datasets"], health
        sample = json.loads((tmp_path / "converted/my_robot/val.jsonl").read_text().splitlines()[0])
        image = np.asarray(Image.open(tmp_path / "converted" / sample["image"]).convert("RGB"))
        status, body = _http(base + "/act", {"image": _json_numpy(image), "instruction": sample["instruction"],
                                             "unnorm_key": "my_robot"})
        action = _decode_action(body)
        assert status == 200 and action.shape == (7,) and np.isfinite(action).all(), body
        # un-normalized with the import's statistics: inside the data's range (q01..q99 of the fixture's actions)
        stats = json.loads((tmp_path / "converted/my_robot/dataset_statistics.json").read_text())["my_robot"]["action"]
        lo, hi = np.asarray(stats["q01"]), np.asarray(stats["q99"])
        assert (action[:6] >= lo[:6] - 1e-6).all() and (action[:6] <= hi[:6] + 1e-6).all(), (action, lo, hi)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
