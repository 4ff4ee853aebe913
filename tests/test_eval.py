"""Offline evaluation CLI: report.json keys and values, the figure, predictions consistent with VLAPolicy."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import requires_upstream, run_py
from llava_vla_plugin.infer.eval import sample_instruction, summarize
from test_policy import policy_results

SUMMARY_KEYS = {"n", "action_accuracy_generated", "action_accuracy_generated_per_dim", "l1_normalized", "l1_normalized_per_dim",
                "l1_unnormalized", "l1_unnormalized_per_dim", "gripper_accuracy", "seconds", "samples_per_s"}


def test_summarize_by_hand():
    pred_bins = np.array([[0, 5], [3, 3]])
    true_bins = np.array([[0, 4], [3, 3]])
    pred_norm = np.array([[0.0, 0.5], [0.1, 0.2]])
    true_norm = np.array([[0.5, 0.5], [0.1, 0.0]])
    pred_raw = np.array([[1.0, 0.9], [2.0, 0.1]])  # gripper (last) 0.9 -> open, 0.1 -> closed
    true_raw = np.array([[0.0, 1.0], [2.0, 1.0]])
    s = summarize(pred_bins, true_bins, pred_norm, true_norm, pred_raw, true_raw, seconds=4.0)
    assert set(s) == SUMMARY_KEYS
    assert s["action_accuracy_generated"] == 0.75 and s["action_accuracy_generated_per_dim"] == [1.0, 0.5]
    assert s["l1_normalized_per_dim"] == pytest.approx([0.25, 0.1])
    assert s["l1_unnormalized_per_dim"] == pytest.approx([0.5, 0.5]) and s["l1_unnormalized"] == pytest.approx(0.5)
    assert s["gripper_accuracy"] == 0.5 and s["samples_per_s"] == 0.5


def test_instruction_recovered_from_the_human_turn():
    template = "What action should the robot take to {instruction}?"
    sample = {"conversations": [{"from": "human", "value": "<image>\nWhat action should the robot take to open it?"}]}
    assert sample_instruction(sample, template) == "open it"
    assert sample_instruction({**sample, "instruction": "Open It"}, template) == "Open It"


def test_cli_usage_errors(tmp_path):
    proc = run_py(["-m", "llava_vla_plugin.infer.eval", "--help"])
    assert proc.returncode == 0 and "--max-samples" in proc.stdout and "l1_unnormalized" in proc.stdout
    assert run_py(["-m", "llava_vla_plugin.infer.eval", "--checkpoint", "x"]).returncode == 2
    (tmp_path / "vla_action_tokenizer.json").write_text(json.dumps({"action_dim": 7}))
    proc = run_py(["-m", "llava_vla_plugin.infer.eval", "--checkpoint", str(tmp_path), "--data", str(tmp_path / "missing.jsonl"),
                   "--image-folder", str(tmp_path), "--report", str(tmp_path / "r")])
    assert proc.returncode == 1 and "missing.jsonl does not exist" in proc.stderr


@requires_upstream
def test_eval_writes_report_and_figure(tiny_model, tmp_path_factory):
    info, results = policy_results(tiny_model, tmp_path_factory)
    data, report_dir = info["data"], tmp_path_factory.mktemp("eval") / "report"
    proc = run_py(["-m", "llava_vla_plugin.infer.eval", "--checkpoint", str(info["ckpt"]),
                   "--data", str(data / "ds_a/val.jsonl"), str(data / "ds_b/val.jsonl"), "--image-folder", str(data),
                   "--max-samples", "2", "--batch-size", "2", "--report", str(report_dir)], env=info["env"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads((report_dir / "report.json").read_text())
    assert set(report["datasets"]) == {"ds_a", "ds_b"}
    for name, s in report["datasets"].items():
        assert set(s) == SUMMARY_KEYS | {"unnorm_key", "action_repr"} and s["n"] == 2 and s["unnorm_key"] == name
        assert s["action_repr"] == "bins"  # every row names the representation (issue 23 item 4)
        for key in ("action_accuracy_generated_per_dim", "l1_normalized_per_dim", "l1_unnormalized_per_dim"):
            assert len(s[key]) == 7
        assert 0 <= s["action_accuracy_generated"] <= 1 and 0 <= s["gripper_accuracy"] <= 1 and s["samples_per_s"] > 0
        assert s["l1_normalized"] == pytest.approx(np.mean(s["l1_normalized_per_dim"]))
    assert report["overall"]["n"] == 4 and {"samples_per_s", "l1_unnormalized", "gripper_accuracy"} <= set(report["overall"])
    png = (report_dir / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # the predictions are VLAPolicy's (batched, left-padded) and the metrics follow from them
    rows = [json.loads(line) for line in (report_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["action_repr"] for r in rows} == {"bins"}
    assert report["action_repr"]["name"] == "bins" and report["action_repr"]["horizon"] == 1
    assert "\nbins: 4 samples" in proc.stdout and "  ds_a (bins): n=2" in proc.stdout
    by_id = {r["id"]: r for r in rows}
    first_a = by_id["ds_a/val/000000/0000"]
    case = results["cases"][0]
    assert first_a["pred_token_ids"] == case["hand_ids"][:7] and first_a["pred_action"] == case["hand_action"]
    for case in results["cases"][1:3]:  # ds_b val 0 and 1 with their own instructions and statistics
        row = by_id[f"ds_b/val/{int(case['image'].split('/')[-2]):06d}/0000"]
        assert row["pred_action"] == case["policy_action"]
    a_rows = [r for r in rows if r["dataset"] == "ds_a"]
    l1 = np.mean([np.abs(np.subtract(r["pred_normalized"], r["true_normalized"])) for r in a_rows])
    assert report["datasets"]["ds_a"]["l1_normalized"] == pytest.approx(l1)
