import json

import pytest
import yaml

from llava_vla_plugin.core.training_data import apply_weight, find_statistics, load_data, parse_sources


def _write(path, n, ds):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"{ds}/{i}", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": [0.0] * 7}]}) + "\n")


def test_mixture_yaml_with_weights_is_seeded(tmp_path):
    _write(tmp_path / "a/train.jsonl", 10, "a")
    _write(tmp_path / "b/train.jsonl", 10, "b")
    (tmp_path / "a/dataset_statistics.json").write_text(json.dumps({"a": {"action": {}}}))
    (tmp_path / "mixture.yaml").write_text(yaml.safe_dump({"datasets": [
        {"json_path": "a/train.jsonl", "weight": 2.0},
        {"json_path": "b/train.jsonl", "weight": 0.5, "sampling_strategy": "all"}]}))
    samples, sources = load_data(str(tmp_path / "mixture.yaml"), seed=0)
    ids = [s["id"] for s in samples]
    assert sum(i.startswith("a/") for i in ids) == 20 and sum(i.startswith("b/") for i in ids) == 5
    again, _ = load_data(str(tmp_path / "mixture.yaml"), seed=0)
    assert [s["id"] for s in again] == ids
    other, _ = load_data(str(tmp_path / "mixture.yaml"), seed=1)
    assert [s["id"] for s in other] != ids
    assert find_statistics(sources) == {"a": {"action": {}}}


def test_upstream_sampling_strategies(tmp_path):
    _write(tmp_path / "a.jsonl", 10, "a")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"datasets": [{"json_path": str(tmp_path / "a.jsonl"), "sampling_strategy": "first:30%"}]}))
    samples, _ = load_data(str(tmp_path / "m.yaml"))
    assert [s["id"] for s in samples] == ["a/0", "a/1", "a/2"]


def test_bad_inputs_name_the_file(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_data(str(tmp_path / "bad.jsonl"))
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"datasets": [{"json_path": "x.jsonl", "weight": -1}]}))
    with pytest.raises(ValueError, match="weight"):
        parse_sources(str(tmp_path / "m.yaml"))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_data(str(tmp_path / "nope.jsonl"))


def test_apply_weight_counts():
    import numpy as np

    base = [{"i": i} for i in range(100)]
    assert len(apply_weight(base, 1.5, np.random.default_rng(0))) == 150
    assert len(apply_weight(base, 0.25, np.random.default_rng(0))) == 25
    assert apply_weight(base, 0.0, np.random.default_rng(0)) == []


def test_larger_weights_keep_the_frames_of_smaller_ones(tmp_path):
    _write(tmp_path / "a/train.jsonl", 200, "a")
    kept = []
    for w in (0.1, 0.3, 0.7):
        (tmp_path / "m.yaml").write_text(yaml.safe_dump({"datasets": [{"json_path": "a/train.jsonl", "weight": w}]}))
        kept.append({s["id"] for s in load_data(str(tmp_path / "m.yaml"), seed=3)[0]})
    assert [len(k) for k in kept] == [20, 60, 140]
    assert kept[0] <= kept[1] <= kept[2]


def test_sample_store_access_lengths_and_overrides(tmp_path):
    import json as _json

    from llava_vla_plugin.core.training_data import text_length

    _write(tmp_path / "a/train.jsonl", 3, "a")
    plain = {"id": "p0", "image": "x.jpg", "conversations": [{"from": "human", "value": "what is this thing"}, {"from": "gpt", "value": "a cup"}]}
    (tmp_path / "b.json").write_text(_json.dumps([plain]))
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"datasets": [{"json_path": "a/train.jsonl", "weight": 2.0},
                                                                  {"json_path": "b.json"}]}))
    store, _ = load_data(str(tmp_path / "m.yaml"))
    assert len(store) == 7
    assert [s["id"] for s in store] == ["a/0", "a/1", "a/2", "a/0", "a/1", "a/2", "p0"]
    assert store[-1]["_source"].endswith("b.json") and store[0]["_source"].endswith("a/train.jsonl")
    assert store.text_lengths().tolist() == [text_length(s) for s in store] == [9] * 6 + [6]
    assert store.has_media().tolist() == [False] * 6 + [True]
    store[6] = {**plain, "id": "fixed"}
    assert store[6]["id"] == "fixed" and store[5]["id"] == "a/2"
    with pytest.raises(IndexError):
        store[7]
