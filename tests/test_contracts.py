"""The shared contracts on a real conversion: the converted format (data_tools/converted_format.py) and
BOUNDS_Q99 normalization (data_tools/normalize.py), from convert's output to the policy's un-normalized action."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_tools.converted_format import (
    IGNORE_INDEX,
    STATISTICS_FILE,
    TRAIN_FILE,
    ConvertedSample,
    SampleFormatError,
    human_turn,
    is_action_sample,
    sample_instruction,
)
from llava_vla_plugin.apps.rlds_fixture import write_rlds_dataset


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from data_tools.convert import DatasetRequest, RunOptions, convert
    from data_tools.registry import Registry

    root = tmp_path_factory.mktemp("rlds")
    # bridge_orig: gripper dimension outside the mask; language_table: unused dims (min == max -> 0)
    write_rlds_dataset(root, "bridge_orig", splits={"train": 5}, steps=(3, 6), image_size=(12, 16), seed=1)
    write_rlds_dataset(root, "language_table", splits={"train": 5}, steps=(3, 6), image_size=(12, 16), seed=2)
    out = tmp_path_factory.mktemp("out")
    assert convert(root, [DatasetRequest("bridge_orig"), DatasetRequest("language_table")], out, Registry.load(),
                   RunOptions(), progress=False) == {}
    return out


def _samples(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / name / TRAIN_FILE).read_text().splitlines()]


def test_converted_lines_are_typed_samples_with_an_instruction(converted):
    for name in ("bridge_orig", "language_table"):
        samples = _samples(converted, name)
        assert samples
        for s in samples:
            assert is_action_sample(s)
            typed = ConvertedSample.from_dict(s)
            assert typed.instruction == s["instruction"] and typed.id == s["id"] and typed.image == s["image"]
            assert s["conversations"][0]["value"] == human_turn(s["instruction"])
            # the fast writer and json.dumps of the same fields agree
            assert json.loads(typed.to_json_line()) == s


def test_old_converted_data_without_instruction_still_reads(converted):
    s = _samples(converted, "bridge_orig")[0]
    old = {k: v for k, v in s.items() if k != "instruction"}
    # the old format carried the instruction only inside the (lowercased) prompt
    assert sample_instruction(old) == s["instruction"].lower()
    assert ConvertedSample.from_dict(old).instruction == s["instruction"].lower()
    with pytest.raises(SampleFormatError, match="does not follow the prompt template"):
        sample_instruction({**old, "conversations": [{"from": "human", "value": "hi"}, old["conversations"][1]]})
    assert not is_action_sample({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
    assert IGNORE_INDEX == -100  # upstream LLaVA's and torch's cross-entropy convention


def test_round_trip_convert_to_policy_unnormalize(converted):
    """convert's normalized actions, un-normalized by the policy's code with the checkpoint-format statistics,
    give back the raw actions (inside [q01, q99]); through the action tokenizer within half a bin."""
    from llava_vla_plugin.core.action_tokenizer import ActionTokenizer
    from llava_vla_plugin.core.normalization import action_stats, load_statistics, unnormalize_actions

    tok = ActionTokenizer()
    checked = 0
    for name in ("bridge_orig", "language_table"):
        stats = load_statistics(converted / name / STATISTICS_FILE)  # what a checkpoint carries
        a = action_stats(stats, None)
        q01, q99, mask = np.asarray(a["q01"]), np.asarray(a["q99"]), np.asarray(a["mask"], bool)
        unused = np.asarray(a["min"]) == np.asarray(a["max"])
        samples = _samples(converted, name)
        norm = np.asarray([s["conversations"][1]["value"] for s in samples], np.float64)
        raw = np.asarray([s["action_raw"] for s in samples], np.float64)
        back = unnormalize_actions(norm, a)
        inside = (raw >= q01) & (raw <= q99) & mask & ~unused
        assert inside.any()
        # forward runs in float32 with +1e-8 in the denominator, the inverse in float64 without it
        np.testing.assert_allclose(back[inside], raw[inside], rtol=0, atol=1e-5 * max(1.0, np.abs(raw).max()))
        keep = ~mask & ~unused  # the gripper passes through both maps unchanged
        np.testing.assert_array_equal(back[:, keep].astype(np.float32), raw[:, keep].astype(np.float32))
        assert (norm[:, unused] == 0).all()  # OpenVLA maps unused dimensions to 0
        via_tokens = unnormalize_actions(tok.decode(tok.encode(norm)), a)
        half_bin = 0.5 * tok.bin_width * 0.5 * (q99 - q01)
        err = np.abs(via_tokens - back)
        assert (err[:, mask] <= half_bin[mask] + 1e-9).all()
        checked += int(inside.sum())
    assert checked > 20


def test_normalize_and_unnormalize_share_bounds_and_document_the_epsilon():
    from data_tools.normalize import FORWARD_EPSILON, ActionStatistics, normalize_bounds_q99, unnormalize_bounds_q99

    # dims: plain, plain, q01 == q99 but varying (only the epsilon keeps it finite), unused (min == max)
    stats = {"action": {"q01": [0.0, -2.0, 1.0, 1.0], "q99": [1.0, 2.0, 1.0, 1.0], "min": [0.0, -3.0, 0.0, 1.0],
                        "max": [2.0, 3.0, 2.0, 1.0], "mask": [True, True, True, False]}}
    s = ActionStatistics.from_mapping(stats)
    assert s.unused.tolist() == [False, False, False, True]
    x = np.array([[0.5, 1.0, 1.0, 1.0]], np.float32)
    with np.errstate(all="raise"):  # no 0/0: the forward epsilon is deliberate
        y = normalize_bounds_q99(x, stats)
    assert y.dtype == np.float32
    assert y[0].tolist() == [0.0, 0.5, -1.0, 0.0]  # 2*0/(0+1e-8)-1 = -1; unused dimension -> 0
    assert FORWARD_EPSILON == 1e-8
    back = unnormalize_bounds_q99(y, stats["action"])  # the "action" entry alone is accepted too
    assert back.dtype == np.float64
    assert back[0, 1] == 1.0 and back[0, 0] == 0.5
    assert back[0, 2] == 1.0  # the inverse has no epsilon: 0.5*(y+1)*(q99-q01)+q01, exactly OpenVLA's
    with pytest.raises(ValueError, match="do not match"):
        unnormalize_bounds_q99(np.zeros(3), stats)


# ---- the dataset catalog: one owner (data_tools/registry/oxe.yaml) --------------------------------------
def test_every_preset_dataset_resolves_through_the_registry():
    from data_tools.download_spec import load_mixture, named_mixtures
    from data_tools.registry import Registry

    catalog = Registry.load().catalog()
    presets = named_mixtures()
    assert len(presets) >= 5
    for preset, path in presets.items():
        for entry in load_mixture(path).datasets:
            info = catalog[entry.name]  # KeyError: a preset names a dataset the registry does not know
            assert info.version is not None, f"{preset}: {entry.name} has no public version"
            assert entry.version == info.version and entry.source == info.url(), (preset, entry)


def test_catalog_versions_match_the_shared_schemas():
    """Every dataset with a schema taken from its real dataset_info.json has that version in the catalog,
    and says so (version_source: schema); the others name their evidence."""
    from data_tools.registry import Registry
    from llava_vla_plugin.apps.rlds_fixture import available_schemas

    catalog = Registry.load().catalog()
    schemas = available_schemas()
    assert catalog["language_table"].version == "0.0.1"  # issue 10: it was listed as 0.1.0
    checked = 0
    for name, folder in schemas.items():
        info = json.loads((folder / "dataset_info.json").read_text())
        assert catalog[name].version == info["version"] == folder.name, name
        assert catalog[name].version_source == "schema", name
        checked += 1
    assert checked >= 4
    assert {i.version_source for i in catalog.values()} <= {"schema", "oxe_colab", "unverified", "none", "hf_repo"}
    assert all((i.version is None) == (i.version_source == "none") for i in catalog.values())
