"""checkpoint.py, the one owner of a checkpoint's VLA files: what is written is read back the same, and what
is copied (a LoRA merge, an export) carries the same representation, H, statistics and token map.
The model-level round trips run where those checkpoints are made: LoRA unmerged/merged and a bins_chunk
merge in test_lora.py, ZeRO-2/3 in test_deepspeed.py, the export in test_export_hf.py and test_lora.py,
and today's checkpoint files of every representation in test_golden.py."""
from __future__ import annotations

import json

import pytest
import torch

from llava_vla_plugin.core import checkpoint
from llava_vla_plugin.core.representations import HEAD_FILE, REPR_FILE, ActionReprConfig, make_representation
from llava_vla_plugin.core.action_tokenizer import ActionTokenizer

STATS = {"ds_a": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}},
         "ds_b": {"action": {"q01": [0.0] * 7, "q99": [2.0] * 7, "mask": [True] * 7}}}


def _head_state(rep) -> dict:
    """parallel_l1's head weights as the trainer's gathered state dict holds them (no model needed)."""
    from llava_vla_plugin.core.representations.parallel_l1 import L1RegressionHead

    head = L1RegressionHead(16, rep.action_dim, rep.horizon, 16, slot_token_id=151902)
    return {f"vla_action_head.{k}": v for k, v in head.state_dict().items()}


@pytest.mark.parametrize("name,horizon", [("bins", 1), ("bins_chunk", 8), ("parallel_l1", 4)])
def test_written_is_read_and_carried_the_same(tmp_path, name, horizon):
    at = ActionTokenizer(first_token_id=151646)
    rep = make_representation(ActionReprConfig(name=name, horizon=horizon), at)
    src, dst = tmp_path / "run", tmp_path / "merged"
    dst.mkdir()
    state = _head_state(rep) if name == "parallel_l1" else None
    checkpoint.write(src, at, STATS, action_repr=rep, state_dict=state)
    for d in (src, dst):
        (d / "config.json").write_text("{}")
    copied = checkpoint.copy_policy_files(src, dst)
    assert set(copied) == {"vla_action_tokenizer.json", "dataset_statistics.json", REPR_FILE} | (
        {HEAD_FILE} if name == "parallel_l1" else set())
    a, b = checkpoint.read(src), checkpoint.read(dst)
    for ck in (a, b):
        assert (ck.repr_config.name, ck.repr_config.horizon) == (name, horizon)
        assert ck.statistics == STATS
        assert ck.action_tokenizer.token_ids.tolist() == list(range(151646, 151902))
        assert ck.action_tokenizer.prompt == at.prompt
    if name == "parallel_l1":
        from safetensors.torch import load_file

        got = load_file(str(dst / HEAD_FILE))
        assert all(torch.equal(got[k[len("vla_action_head."):]], v) for k, v in state.items())


def test_an_old_checkpoint_reads_as_single_step_bins(tmp_path):
    ActionTokenizer(first_token_id=151646).save(tmp_path)
    (tmp_path / "dataset_statistics.json").write_text(json.dumps(STATS))
    (tmp_path / "config.json").write_text("{}")
    ck = checkpoint.read(tmp_path)
    assert (ck.repr_config.name, ck.repr_config.horizon, ck.repr_config.action_dim) == ("bins", 1, 7)


def test_a_checkpoint_without_its_statistics_is_refused_by_name(tmp_path):
    ActionTokenizer(first_token_id=151646).save(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(checkpoint.CheckpointError, match="dataset_statistics.json"):
        checkpoint.read(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="dataset_statistics.json"):
        checkpoint.copy_policy_files(tmp_path, tmp_path / "x")
