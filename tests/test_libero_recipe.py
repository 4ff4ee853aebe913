"""The LIBERO recipe's data half, offline: the presets name OpenVLA's modified LIBERO RLDS on the Hugging
Face Hub (hf://), download fetches a local copy laid out like that repository (<repo>/<dataset>/<version>/),
and convert applies OpenVLA's libero_dataset_transform to it. No network: the Hub is only named, never
contacted (open_source builds huggingface_hub's filesystem without a request)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import ROOT, run_py, subprocess_env

SUITES = ["libero_spatial", "libero_object", "libero_goal", "libero_10"]
HF_REPO = "hf://datasets/openvla/modified_libero_rlds"


def test_presets_point_at_the_hugging_face_dataset():
    from data_tools.download import _endpoint, open_source
    from data_tools.download_spec import load_mixture

    for suite in SUITES:
        (entry,) = load_mixture(suite).datasets
        assert entry.name == f"{suite}_no_noops" and entry.version == "1.0.0" and entry.weight == 1.0
        assert entry.source == f"{HF_REPO}/{suite}_no_noops/1.0.0"
    assert [e.name for e in load_mixture("libero_4_suites").datasets] == [f"{s}_no_noops" for s in SUITES]
    fs, root = open_source(f"{HF_REPO}/libero_10_no_noops/1.0.0")
    assert type(fs).__name__ == "HfFileSystem" and root == "datasets/openvla/modified_libero_rlds/libero_10_no_noops/1.0.0"
    assert _endpoint(f"{HF_REPO}/x/1.0.0") == ("huggingface.co", 443)


@pytest.fixture(scope="module")
def hf_copy(tmp_path_factory):
    """A local clone of openvla/modified_libero_rlds with one small suite (full LIBERO schema, 32x32 frames)."""
    from llava_vla_plugin.apps.eval_demo import libero_like_features
    from llava_vla_plugin.apps.rlds_fixture import write_rlds_dataset

    root = tmp_path_factory.mktemp("hf") / "openvla" / "modified_libero_rlds"
    schema = root.parent.parent / "_schema"
    schema.mkdir()
    libero_like_features(32, full=True).save_config(str(schema))
    # robosuite's gripper convention in the raw actions: -1 open, +1 close, alternating per step
    step_fn = lambda ep, t, rng: {"action": np.array([0.1 * t, 0, 0, 0, 0, 0, 1.0 if t % 2 else -1.0], np.float32)}  # noqa: E731
    write_rlds_dataset(root, "libero_spatial_no_noops", "1.0.0", schema=schema, splits={"train": 4}, steps=5, shards=2,
                       step_fn=step_fn)
    return root


def test_download_from_a_local_copy_of_the_hf_repo_then_convert(hf_copy, tmp_path):
    data, out = tmp_path / "data", tmp_path / "converted"
    # --source-root: the local clone stands in for hf://datasets/openvla/modified_libero_rlds (no network here)
    proc = run_py(["-m", "data_tools.download", "--mixture", "libero_spatial", "--out", str(data),
                   "--source-root", str(hf_copy), "--no-progress"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = data / "libero_spatial_no_noops" / "1.0.0"
    manifest = json.loads((got / "download_manifest.json").read_text())
    assert manifest["source"] == str(hf_copy / "libero_spatial_no_noops" / "1.0.0")
    assert sorted(p.name for p in got.glob("*.tfrecord-*")) == sorted(
        p.name for p in (hf_copy / "libero_spatial_no_noops" / "1.0.0").glob("*.tfrecord-*"))

    proc = run_py(["-m", "data_tools.convert", "--data-dir", str(data), "--mixture", "libero_spatial", "--out", str(out),
                   "--no-progress"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(l) for s in ("train", "val") if (out / "libero_spatial_no_noops" / f"{s}.jsonl").exists()
            for l in (out / "libero_spatial_no_noops" / f"{s}.jsonl").open()]
    assert len(rows) == 20
    for r in rows:  # libero_dataset_transform: clip to [0, 1] then invert: -1 (open) -> 1, +1 (close) -> 0
        assert r["action_raw"][-1] == (0.0 if r["step"] % 2 else 1.0), r["id"]
        assert r["action_raw"][0] == pytest.approx(0.1 * r["step"], abs=1e-6)
