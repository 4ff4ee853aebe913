"""training_curves: the PNG every finished run writes (the run itself: test_launcher's default run)."""
from __future__ import annotations

import json

from PIL import Image

from llava_vla_plugin.train import training_curves
HISTORY = [
    {"step": 1, "loss": 5.0, "action_accuracy_teacher_forced": 0.0},
    {"step": 2, "loss": 4.0},
    {"step": 2, "val_action_loss": 4.5, "val_action_accuracy_teacher_forced": 0.1,
     "val_action_accuracy_teacher_forced_constrained": 0.2, "val_action_l1": 0.3},
    {"step": 2, "train_runtime": 1.0, "train_loss": 4.5},  # the trainer's summary record: not a point
]


def test_curves_reads_train_and_validation_points():
    train, val = training_curves.curves(HISTORY)
    assert train == [(1, 5.0), (2, 4.0)]
    assert val["val_action_loss"] == [(2, 4.5)] and val["val_action_accuracy_teacher_forced_constrained"] == [(2, 0.2)]
    assert training_curves.curves(HISTORY[:2])[1] == {}


def test_png_with_and_without_validation_and_the_cli(tmp_path, capsys):
    path = training_curves.write_training_curves(tmp_path / "run", HISTORY, "title")
    assert path == tmp_path / "run" / "training_curves.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (1100, 400)
    no_val = training_curves.write_training_curves(tmp_path, HISTORY[:2], out=tmp_path / "x.png")
    with Image.open(no_val) as im:
        assert im.size == (600, 400)  # one panel: no VAL_DATA
    assert not list(tmp_path.rglob(".*.tmp"))  # written atomically: no temporary left behind

    # an unfinished run: the newest checkpoint's trainer_state.json
    for step in (2, 10):
        ckpt = tmp_path / "live" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": HISTORY[:step // 5 + 1]}))
    assert training_curves.main([str(tmp_path / "live")]) == 0
    assert (tmp_path / "live" / "training_curves.png").is_file()
    assert "checkpoint-10" in training_curves.find_trainer_state(tmp_path / "live").parent.name
    assert training_curves.main([str(tmp_path / "nothing")]) == 2
    assert "no trainer_state.json" in capsys.readouterr().err


def test_per_dataset_validation_accuracy_lines():
    """Per-dataset accuracies (trainer.validation_metrics' val_<dataset>_action_accuracy_teacher_forced) become
    curves of their own, drawn in the validation panel; other per-dataset keys and the mixture-wide key do not."""
    import io

    import numpy as np

    per = [dict(HISTORY[2], step=s, val_bridge_orig_action_accuracy_teacher_forced=0.1 * s,
                val_fractal20220817_data_action_accuracy_teacher_forced=0.9 - 0.1 * s,
                val_bridge_orig_action_loss=3.0, val_bridge_orig_action_tokens=70) for s in (2, 4)]
    history = HISTORY[:2] + per
    _, val = training_curves.curves(history)
    assert val["val_bridge_orig_action_accuracy_teacher_forced"] == [(2, 0.2), (4, 0.4)]
    assert val["val_fractal20220817_data_action_accuracy_teacher_forced"] == [(2, 0.7), (4, 0.5)]
    assert "val_bridge_orig_action_loss" not in val and "val_bridge_orig_action_tokens" not in val
    without = [{k: v for k, v in h.items() if "bridge" not in k and "fractal" not in k} for h in history]
    pixels = [np.asarray(Image.open(io.BytesIO(training_curves.render_png(h))).convert("RGB"), np.int16) for h in (history, without)]
    assert pixels[0].shape == pixels[1].shape and np.abs(pixels[0] - pixels[1]).sum(-1).astype(bool).sum() > 500
