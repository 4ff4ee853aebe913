"""`make demo` (llava_vla_plugin.apps.demo), reduced, from a folder outside the clone, in a user's environment
(no HF_HOME, no HF_HUB_OFFLINE: printed_commands.user_env), then every command it prints under `next`,
verbatim, through bash, from that same folder:
  * the offline eval runs to completion (and prints the free-running accuracy the demo points at);
  * the longer training starts training (OUTPUT_DIR/launch_config.yaml is committed once the model and
    data have loaded and the trainer starts), then is stopped: the 2-step demo run already showed the
    same launcher call finishing;
  * the server answers /health on port 8000, then is stopped with SIGTERM.
Reduced: 2 training steps, 48x64 frames and the session's tiny model (--tiny-model) instead of a second build.
`make demo` runs the defaults (30 steps, 96x128, its own tiny model), about 3 minutes."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest
from PIL import Image

from conftest import requires_upstream, skip_unless_ci
from printed_commands import Started, listening, next_commands, port_free, run_verbatim, user_env

pytestmark = [requires_upstream, pytest.mark.slow]


def test_demo_reduced_and_its_next_commands_run_as_printed(tiny_model, tmp_path):
    env = user_env()
    work = tmp_path / "demo_out"
    proc = subprocess.run([sys.executable, "-m", "llava_vla_plugin.apps.demo", "--workdir", str(work), "--steps", "2",
                           "--image-size", "48x64", "--tiny-model", str(tiny_model.root)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    # the accuracies say what they are, and which one to read
    assert "teacher-forced" in out and "argmax over the whole vocabulary" in out and "argmax over the 256 action tokens" in out
    assert "The accuracy to read is the free-running policy accuracy" in out
    run = work / "run"
    with Image.open(run / "training_curves.png") as im:
        assert im.format == "PNG" and im.size == (1100, 400)  # VAL_DATA is set: loss and validation panels

    commands = next_commands(out)
    assert len(commands) == 3, commands
    (_, evaluate), (_, serve), (_, train) = commands
    assert "llava_vla_plugin.infer.eval " in evaluate and "--report" not in evaluate
    for command in commands:  # each one that loads the tiny model says where its tower is
        assert command[1].startswith(f"HF_HOME={tiny_model.hf_home} HF_HUB_OFFLINE=1 "), command
    log = tmp_path / "next.log"

    printed = run_verbatim(evaluate, tmp_path, env, log)
    assert "generated token accuracy" in printed
    report = json.loads((work / "eval" / "report.json").read_text())
    assert report["overall"]["n"] > 0

    assert "finetune_ov_vla.sh" in train and "NUM_GPUS=0" in train
    longer = work / "run-100"
    assert f"OUTPUT_DIR={longer} " in train
    with Started(train, tmp_path, env, log) as training:
        training.wait_for(lambda: (longer / "launch_config.yaml").is_file(), "training start (launch_config.yaml)")

    if not port_free(8000):
        skip_unless_ci(f"port 8000 is taken on this machine: the printed serve command was not run (the eval and "
                       f"train commands were); {serve}")
    with Started(serve, tmp_path, env, log) as server:
        server.wait_for(lambda: listening(8000), "server on port 8000", timeout=300)
        with urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=60) as response:
            health = json.loads(response.read())
        assert response.status == 200 and "bridge_orig" in health["datasets"], health
        assert server.stop() == 0, log.read_text()[-3000:]
