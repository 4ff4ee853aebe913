"""data_tools.convert on fixtures with real OXE schemas, checked against OpenVLA's documented semantics.

The expected frames, instructions, actions and statistics are computed here by hand from the raw fixture
values (read back with tfds itself), following openvla/openvla prismatic/vla/datasets/rlds/oxe/transforms.py
and utils/data_utils.py, not by calling the converter's own transforms.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from conftest import shared_schemas_missing
from llava_vla_plugin.apps.rlds_fixture import available_schemas, write_rlds_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "oxe_schemas"
GRIP = np.array([-1.2, -1.0, -0.5, 0.0, 0.02, 0.05, 0.5, 0.97, 1.0, 1.3], np.float32)


# ----------------------------------------------------------------------------------------------
# OpenVLA semantics, written out by hand


def rel2abs(g):
    cmds = [1 if v < -0.1 else (-1 if v > 0.1 else 0) for v in np.ravel(g)]
    first = next((c for c in cmds if c), 0)
    state = -first if first else 1
    out = []
    for c in cmds:
        state = c or state
        out.append(state / 2 + 0.5)
    return np.array(out)


def binarize(g):
    g = np.ravel(g).astype(np.float32)
    out, carry = [0.0] * len(g), g[-1]
    for i in range(len(g) - 1, -1, -1):
        carry = 1.0 if g[i] > 0.95 else (0.0 if g[i] < 0.05 else carry)
        out[i] = carry
    return np.array(out)


def clip01(x):
    return np.clip(np.ravel(x), 0, 1)


def rpy(q):
    x, y, z, w = np.asarray(q, np.float64).T
    return np.stack([np.arctan2(2 * (w * x + y * z), 1 - 2 * (x * x + y * y)),
                     np.arcsin(np.clip(2 * (w * y - z * x), -1, 1)),
                     np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))], 1)


def cat(*cols):
    arrs = [np.asarray(c, np.float64) for c in cols]
    return np.concatenate([c.reshape(len(c), int(np.prod(c.shape[1:]))) if c.ndim > 1 else c[:, None] for c in arrs], 1)


def nli(s):
    return [b.decode() for b in s["observation"]["natural_language_instruction"]]


def li(s):
    return [b.decode() for b in s["language_instruction"]]


A = lambda s: np.asarray(s["action"], np.float64)  # noqa: E731
WV = lambda s: s["action"]["world_vector"]  # noqa: E731
RD = lambda s: s["action"]["rotation_delta"]  # noqa: E731
GCA = lambda s: np.ravel(s["action"]["gripper_closedness_action"])  # noqa: E731
ZEROS = lambda n: (lambda s: np.zeros((len(s["is_first"]), n)))  # noqa: E731


def bridge_orig(s):
    """Drop the first step, binarize the gripper, relabel movement from state deltas, drop the last step."""
    state = np.asarray(s["observation"]["state"], np.float64)[1:]
    grip = binarize(A(s)[1:, 6]) if len(state) else np.zeros(0)
    moved = state[1:, :6] - state[:-1, :6]
    return cat(moved, grip[:-1]), 1, 1


# name -> (action(steps) -> (T, 7) [, or (action, dropped_first, dropped_last)], instructions(steps) -> list)
EXPECT: dict[str, tuple[Callable[[Any], Any], Callable[[Any], list[str]]]] = {
    "fractal20220817_data": (lambda s: cat(WV(s), RD(s), rel2abs(GCA(s))), nli),
    "kuka": (lambda s: cat(WV(s), RD(s), rel2abs(GCA(s))), nli),
    "bridge_orig": (bridge_orig, li),
    "language_table": (
        lambda s: cat(A(s), np.zeros((len(A(s)), 4)), np.ones((len(A(s)), 1))),
        lambda s: ["".join(chr(c) for c in row).split("\x00")[0] for row in s["observation"]["instruction"]],
    ),
    "taco_play": (lambda s: cat(s["action"]["rel_actions_world"][:, :6], clip01(s["action"]["rel_actions_world"][:, 6])), nli),
    "jaco_play": (lambda s: cat(WV(s), np.zeros((len(WV(s)), 3)), rel2abs(GCA(s))), nli),
    "viola": (lambda s: cat(WV(s), RD(s), 1 - clip01(GCA(s))), nli),
    "berkeley_autolab_ur5": (lambda s: cat(WV(s), RD(s), rel2abs(GCA(s))), nli),
    "toto": (lambda s: cat(WV(s), RD(s), s["action"]["open_gripper"].astype(float)), nli),
    "roboturk": (lambda s: cat(WV(s), RD(s), 1 - clip01(GCA(s))), nli),
    "berkeley_cable_routing": (lambda s: cat(WV(s), RD(s), np.zeros(len(WV(s)))), nli),
    "stanford_hydra_dataset_converted_externally_to_rlds": (lambda s: cat(A(s)[:, :6], 1 - A(s)[:, 6]), li),
    "austin_buds_dataset_converted_externally_to_rlds": (lambda s: cat(A(s)[:, :6], 1 - clip01(A(s)[:, 6])), li),
    "utaustin_mutex": (lambda s: cat(A(s)[:, :6], 1 - clip01(A(s)[:, 6])), li),
    "bc_z": (lambda s: cat(s["action"]["future/xyz_residual"][:, :3], s["action"]["future/axis_angle_residual"][:, :3],
                           1 - s["action"]["future/target_close"][:, 0]), nli),
    "nyu_franka_play_dataset_converted_externally_to_rlds": (lambda s: cat(A(s)[:, 7:13], clip01(A(s)[:, 13])), li),
    "ucsd_kitchen_dataset_converted_externally_to_rlds": (lambda s: A(s)[:, :7], li),
    "berkeley_fanuc_manipulation": (lambda s: cat(A(s), 1 - s["observation"]["state"][:, 6]), li),
    "dlr_edan_shared_control_converted_externally_to_rlds": (lambda s: cat(A(s)[:, :6], 1 - A(s)[:, 6]), li),
    "cmu_stretch": (lambda s: A(s)[:, :7], li),
    "furniture_bench_dataset_converted_externally_to_rlds": (
        lambda s: cat(A(s)[:, :3], rpy(A(s)[:, 3:7]), 1 - clip01(A(s)[:, 7])), li),
    "iamlab_cmu_pickup_insert_converted_externally_to_rlds": (lambda s: cat(A(s)[:, :3], rpy(A(s)[:, 3:7]), A(s)[:, 7]), li),
    "fmb_dataset": (lambda s: A(s), li),
    "dobbe": (lambda s: A(s), li),
}

O = lambda s, k: np.asarray(s["observation"][k], np.float64)  # noqa: E731
PAD = lambda s, n=1: np.zeros((len(s["is_first"]), n))  # noqa: E731  (a None state key: one zero column)

# name -> proprio(steps) over every raw step, by hand: OpenVLA make_dataset_from_rlds (dataset.py:157-168) concatenates
# the config's state_obs_keys as the standardization transform left them (oxe/transforms.py), a zero column per None
PROPRIO: dict[str, Callable[[Any], Any]] = {
    "fractal20220817_data": lambda s: cat(O(s, "base_pose_tool_reached"), O(s, "gripper_closed")),
    "kuka": lambda s: cat(O(s, "clip_function_input/base_pose_tool_reached"), O(s, "gripper_closed")),
    "bridge_orig": lambda s: cat(O(s, "state")[:, :6], PAD(s), O(s, "state")[:, -1:]),
    "language_table": lambda s: cat(O(s, "effector_translation"), PAD(s, 6)),
    "taco_play": lambda s: cat(O(s, "robot_obs")[:, :6], PAD(s), O(s, "robot_obs")[:, 7:8]),
    "jaco_play": lambda s: cat(O(s, "end_effector_cartesian_pos")[:, :6], PAD(s), O(s, "end_effector_cartesian_pos")[:, -1:]),
    "viola": lambda s: cat(O(s, "joint_states"), O(s, "gripper_states")),
    "berkeley_autolab_ur5": lambda s: O(s, "robot_state")[:, 6:14],
    "toto": lambda s: cat(O(s, "state"), PAD(s)),
    "roboturk": lambda s: PAD(s, 8),
    "berkeley_cable_routing": lambda s: cat(O(s, "robot_state"), PAD(s)),
    "stanford_hydra_dataset_converted_externally_to_rlds": lambda s: cat(
        O(s, "state")[:, :3], O(s, "state")[:, 7:10], PAD(s), O(s, "state")[:, -3:-2]),
    "austin_buds_dataset_converted_externally_to_rlds": lambda s: O(s, "state")[:, :8],
    "utaustin_mutex": lambda s: O(s, "state")[:, :8],
    "bc_z": lambda s: cat(O(s, "present/xyz"), O(s, "present/axis_angle"), PAD(s), O(s, "present/sensed_close")),
    "nyu_franka_play_dataset_converted_externally_to_rlds": lambda s: cat(O(s, "state")[:, -6:], PAD(s), PAD(s)),
    "ucsd_kitchen_dataset_converted_externally_to_rlds": lambda s: cat(O(s, "state")[:, :7], PAD(s)),
    "berkeley_fanuc_manipulation": lambda s: cat(O(s, "state")[:, :6], PAD(s), O(s, "state")[:, 6:7]),
    "dlr_edan_shared_control_converted_externally_to_rlds": lambda s: cat(O(s, "state"), PAD(s)),
    "cmu_stretch": lambda s: cat(O(s, "state")[:, :3], PAD(s, 3), PAD(s), O(s, "state")[:, -1:]),
    "furniture_bench_dataset_converted_externally_to_rlds": lambda s: cat(O(s, "state")[:, :7], O(s, "state")[:, -1:]),
    "iamlab_cmu_pickup_insert_converted_externally_to_rlds": lambda s: cat(O(s, "state")[:, :7], O(s, "state")[:, 7:8]),
    "fmb_dataset": lambda s: cat(O(s, "eef_pose"), O(s, "state_gripper_pose")),
    "dobbe": lambda s: O(s, "state"),
}

UNLABELED = {"fractal20220817_data": [1], "bridge_orig": [2], "utaustin_mutex": [0]}
NAN_AT = {"dlr_edan_shared_control_converted_externally_to_rlds": (2, 1)}  # (episode, step) with a NaN action


def _step_fn(name: str):
    def fn(ep: int, t: int, rng: np.random.Generator) -> dict:
        g = np.float32(GRIP[rng.integers(len(GRIP))])
        vec = rng.normal(0, 0.1, 16).astype(np.float32)
        q = rng.normal(size=4)
        q = (q / np.linalg.norm(q)).astype(np.float32)
        if name in ("fractal20220817_data", "kuka", "jaco_play", "roboturk"):
            return {"action": {"gripper_closedness_action": np.array([g])}}
        if name in ("viola", "berkeley_autolab_ur5"):
            return {"action": {"gripper_closedness_action": g}}
        if name == "taco_play":
            return {"action": {"rel_actions_world": np.r_[vec[:6], g].astype(np.float32)}}
        if name in ("bridge_orig", "stanford_hydra_dataset_converted_externally_to_rlds",
                    "austin_buds_dataset_converted_externally_to_rlds", "utaustin_mutex",
                    "dlr_edan_shared_control_converted_externally_to_rlds"):
            a = np.r_[vec[:6], g].astype(np.float32)
            if NAN_AT.get(name) == (ep, t):
                a[2] = np.nan
            return {"action": a}
        if name in ("furniture_bench_dataset_converted_externally_to_rlds", "iamlab_cmu_pickup_insert_converted_externally_to_rlds"):
            return {"action": np.r_[vec[:3], q, g].astype(np.float32)}
        if name == "nyu_franka_play_dataset_converted_externally_to_rlds":
            a = vec[:15].copy()
            a[13] = g
            return {"action": a}
        return {}

    return fn


def _splits(name: str) -> dict[str, int]:
    info = json.loads((available_schemas()[name] / "dataset_info.json").read_text())
    # 11 train episodes without a val split: tfds rounds 95% of 11 to 10 -> one val episode
    return {s: (11 if s == "train" else 2) for s in info["splits"]}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    schemas = available_schemas()
    names = [n for n in EXPECT if n in schemas]
    missing = sorted(set(EXPECT) - set(names))
    if missing:
        print(f"skipping {len(missing)} schemas: {SHARED} is absent ({', '.join(missing)})")
    root = tmp_path_factory.mktemp("rlds")
    for name in names:
        write_rlds_dataset(root, name, splits=_splits(name), steps=(1, 5), image_size=(12, 16), seed=3,
                           empty_instruction_episodes=UNLABELED.get(name, ()), step_fn=_step_fn(name))
    from data_tools.convert import DatasetRequest, RunOptions, convert
    from data_tools.registry import Registry

    out = tmp_path_factory.mktemp("out")
    failures = convert(root, [DatasetRequest(n) for n in names], out, Registry.load(), RunOptions(), workers=1,
                       progress=False)
    assert failures == {}
    return root, out, names


def _stack(steps: list[dict]) -> dict:
    """A list of per-step nested dicts -> a nested dict of arrays with a leading time axis."""
    if not steps:
        return {"is_first": np.zeros(0, bool)}
    out = {}
    for k, v in steps[0].items():
        if isinstance(v, dict):
            out[k] = _stack([s[k] for s in steps])
        elif isinstance(v, bytes):
            out[k] = [s[k] for s in steps]
        else:
            out[k] = np.stack([np.asarray(s[k]) for s in steps])
    return out


def _raw_episodes(root: Path, name: str) -> dict[str, list[dict]]:
    import tensorflow_datasets as tfds

    d = next((root / name).iterdir())
    b = tfds.builder_from_directory(str(d))
    skip = {k: tfds.decode.SkipDecoding() for k, v in b.info.features["steps"]["observation"].items()
            if isinstance(v, tfds.features.Image)}
    out = {}
    for split in b.info.splits.keys():
        ds = b.as_dataset(split=split, shuffle_files=False, decoders={"steps": {"observation": skip}})
        eps = []
        for ex in tfds.as_numpy(ds):
            eps.append(_stack(list(ex["steps"])))
        out[split] = eps
    return out


def _expected(root: Path, name: str):
    """(samples by split, all transitions for statistics, number of trajectories), by hand."""
    act_fn, lang_fn = EXPECT[name]
    raw = _raw_episodes(root, name)
    all_actions, n_traj = [], 0
    samples: dict[str, list[tuple]] = {"train": [], "val": []}
    has_val = "val" in raw
    n_train = len(raw["train"])
    boundary = n_train if has_val else int(round(0.95 * n_train))  # tfds "closest" rounding of train[:95%]
    for split, episodes in raw.items():
        for idx, s in enumerate(episodes):
            res = act_fn(s)
            action, first, last = res if isinstance(res, tuple) else (res, 0, 0)
            T = len(s["is_first"])
            steps = list(range(first, T - last))
            langs = lang_fn(s)[first:T - last]
            assert len(action) == len(steps)
            finite = np.isfinite(action).all(1)
            all_actions.append(action[finite])
            n_traj += 1
            if has_val:
                dst = split if split in ("train", "val") else None
            else:
                dst = ("train" if idx < boundary else "val") if split == "train" else None
            if dst is None or not any(langs):  # OpenVLA skip_unlabeled
                continue
            for t, step in enumerate(steps):
                if finite[t]:
                    samples[dst].append((idx, step, langs[t], action[t]))
    return samples, np.concatenate(all_actions).astype(np.float32), n_traj


@pytest.mark.parametrize("name", list(EXPECT))
def test_dataset_matches_openvla_semantics(converted, name):
    root, out, names = converted
    if name not in names:
        shared_schemas_missing(f"schema {name}")
    samples, actions, n_traj = _expected(root, name)

    # statistics: OpenVLA get_dataset_statistics over split="all", before skip_unlabeled
    stats = json.loads((out / name / "dataset_statistics.json").read_text())[name]
    a = stats["action"]
    np.testing.assert_allclose(a["mean"], actions.mean(0), atol=1e-5)
    np.testing.assert_allclose(a["std"], actions.std(0), atol=1e-5)
    np.testing.assert_allclose(a["min"], actions.min(0), atol=1e-5)
    np.testing.assert_allclose(a["max"], actions.max(0), atol=1e-5)
    np.testing.assert_allclose(a["q01"], np.quantile(actions, 0.01, axis=0), atol=1e-5)
    np.testing.assert_allclose(a["q99"], np.quantile(actions, 0.99, axis=0), atol=1e-5)
    assert a["mask"] == [True] * 6 + [False]
    assert stats["num_transitions"] == len(actions) and stats["num_trajectories"] == n_traj
    top = json.loads((out / "dataset_statistics.json").read_text())
    assert top[name] == stats

    q01, q99 = np.array(a["q01"]), np.array(a["q99"])
    for split in ("train", "val"):
        lines = [json.loads(x) for x in (out / name / f"{split}.jsonl").read_text().splitlines()]
        exp = samples[split]
        assert [(s["episode"], s["step"]) for s in lines] == [(e, t) for e, t, _, _ in exp], split
        for s, (ep, step, lang, act) in zip(lines, exp):
            assert s["id"] == f"{name}/{split}/{ep:06d}/{step:04d}"
            assert s["image"] == f"{name}/images/{split}/{ep:06d}/{step:04d}.jpg"
            assert (s["dataset"], s["split"]) == (name, split)
            human, gpt = s["conversations"]
            assert human == {"from": "human", "value": f"<image>\nWhat action should the robot take to {lang.lower()}?"}
            np.testing.assert_allclose(s["action_raw"], act, atol=1e-5)
            # BOUNDS_Q99 on the six movement dims, gripper as is, min == max dims -> 0
            norm = np.clip(2 * (act - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)
            norm[6] = act[6]
            norm[np.array(a["min"]) == np.array(a["max"])] = 0.0
            np.testing.assert_allclose(gpt["value"], norm, atol=1e-5)
            assert (out / s["image"]).is_file()


def test_jpeg_bytes_copied_unchanged(converted):
    root, out, names = converted
    raw = _raw_episodes(root, "fractal20220817_data")
    first = json.loads((out / "fractal20220817_data" / "train.jsonl").read_text().splitlines()[0])
    stored = raw["train"][first["episode"]]["observation"]["image"][first["step"]]
    assert (out / first["image"]).read_bytes() == stored


def test_manifest_reports_drops(converted):
    root, out, names = converted
    m = json.loads((out / "fractal20220817_data" / "manifest.json").read_text())
    assert m["counts"]["splits"]["train"]["dropped_episodes"] == {"unlabeled": 1}
    assert m["splits"] == {"train": "train[:95%]", "val": "train[95%:]"}
    assert m["source"]["tfds_name"] == "fractal20220817_data"
    if "dlr_edan_shared_control_converted_externally_to_rlds" in names:
        m = json.loads((out / "dlr_edan_shared_control_converted_externally_to_rlds" / "manifest.json").read_text())
        assert m["counts"]["splits"]["train"]["dropped_frames"].get("nonfinite_action") == 1
    mix = (out / "mixture.yaml").read_text()
    import yaml

    spec = yaml.safe_load(mix)
    entries = spec["datasets"]
    assert [Path(e["json_path"]).parent.name for e in entries] == names
    # weight 1 each, OpenVLA's balanced rule: multipliers m_d with m_d * f_d proportional to num_transitions
    assert spec["vla_mixture"]["weighting"] == "balanced"
    rows = {r["name"]: r for r in spec["vla_mixture"]["datasets"]}
    n_total = sum(r["num_transitions"] for r in rows.values())
    assert all(e["sampling_strategy"] == "all" for e in entries)
    for e in entries:
        r = rows[Path(e["json_path"]).parent.name]
        assert r["share"] == pytest.approx(r["num_transitions"] / n_total) and e["weight"] == pytest.approx(r["effective_frames"] / r["frames"])


def test_enough_schemas_covered(converted):
    _, _, names = converted
    if len(available_schemas()) < 10:
        shared_schemas_missing(f"covering 10 schemas (only {names} ran)")
    assert len(names) >= 10


@pytest.mark.parametrize("name", list(EXPECT))
def test_proprio_matches_openvla(converted, name):
    """<split>_proprio.npz row for row with <split>_actions.npz, and the statistics' proprio entry as OpenVLA's
    get_dataset_statistics computes it with load_proprio=True (data_utils.py:219-257), over the transitions the
    action statistics use."""
    from data_tools.converted_format import EpisodeActions, proprio_source

    root, out, names = converted
    if name not in names:
        shared_schemas_missing(f"schema {name}")
    act_fn = EXPECT[name][0]
    raw = _raw_episodes(root, name)
    rows, per_split = [], {}
    for split, episodes in raw.items():
        for idx, s in enumerate(episodes):
            res = act_fn(s)
            action, first, last = res if isinstance(res, tuple) else (res, 0, 0)
            T = len(s["is_first"])
            prop = PROPRIO[name](s)[first:T - last].astype(np.float32)
            rows.append(prop[np.isfinite(action).all(1)])
            per_split[(split, idx)] = prop
    rows = np.concatenate(rows)
    stats = json.loads((out / name / "dataset_statistics.json").read_text())[name]
    p = stats["proprio"]
    assert proprio_source(stats) == "state"
    for key, want in (("q01", np.quantile(rows, 0.01, axis=0)), ("q99", np.quantile(rows, 0.99, axis=0)),
                      ("mean", rows.mean(0)), ("std", rows.std(0)), ("min", rows.min(0)), ("max", rows.max(0))):
        np.testing.assert_allclose(p[key], want, rtol=1e-5, atol=1e-6, err_msg=key)
    has_val = "val" in raw
    for split in ("train", "val"):
        acts = EpisodeActions.load(out / name / f"{split}_actions.npz")
        prop = EpisodeActions.load(out / name / f"{split}_proprio.npz")
        assert (prop.episodes.tolist(), prop.offsets.tolist(), prop.steps.tolist()) == (
            acts.episodes.tolist(), acts.offsets.tolist(), acts.steps.tolist())
        for ep in prop.episodes.tolist():
            src = split if has_val else "train"
            np.testing.assert_array_equal(prop.episode(ep)[0], per_split[(src, ep)])
