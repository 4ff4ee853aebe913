"""The dataset registry: complete for OpenVLA's EEF_POS datasets, consistent with the real schemas,
extensible by YAML, and helpful about unknown names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import IN_CI, shared_schemas_missing
from data_tools.registry import Registry, RegistryError, UnknownDatasetError

SHARED_SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "oxe_schemas"
BUNDLED_SCHEMAS = Path(__file__).resolve().parents[1] / "llava_vla_plugin" / "testing" / "schemas"

# OXE_DATASET_CONFIGS entries of openvla/openvla with ActionEncoding.EEF_POS (67 of 70)
OPENVLA_EEF_POS = """fractal20220817_data kuka bridge_oxe bridge_orig bridge_dataset taco_play jaco_play
berkeley_cable_routing roboturk nyu_door_opening_surprising_effectiveness viola berkeley_autolab_ur5 toto language_table
columbia_cairlab_pusht_real stanford_kuka_multimodal_dataset_converted_externally_to_rlds
nyu_rot_dataset_converted_externally_to_rlds stanford_hydra_dataset_converted_externally_to_rlds
austin_buds_dataset_converted_externally_to_rlds nyu_franka_play_dataset_converted_externally_to_rlds
maniskill_dataset_converted_externally_to_rlds furniture_bench_dataset_converted_externally_to_rlds
cmu_franka_exploration_dataset_converted_externally_to_rlds ucsd_kitchen_dataset_converted_externally_to_rlds
ucsd_pick_and_place_dataset_converted_externally_to_rlds austin_sailor_dataset_converted_externally_to_rlds
austin_sirius_dataset_converted_externally_to_rlds bc_z utokyo_pr2_opening_fridge_converted_externally_to_rlds
utokyo_pr2_tabletop_manipulation_converted_externally_to_rlds utokyo_xarm_pick_and_place_converted_externally_to_rlds
utokyo_xarm_bimanual_converted_externally_to_rlds robo_net kaist_nonprehensile_converted_externally_to_rlds
stanford_mask_vit_converted_externally_to_rlds tokyo_u_lsmo_converted_externally_to_rlds
dlr_sara_pour_converted_externally_to_rlds dlr_sara_grid_clamp_converted_externally_to_rlds
dlr_edan_shared_control_converted_externally_to_rlds asu_table_top_converted_externally_to_rlds
stanford_robocook_converted_externally_to_rlds imperialcollege_sawyer_wrist_cam
iamlab_cmu_pickup_insert_converted_externally_to_rlds uiuc_d3field utaustin_mutex berkeley_fanuc_manipulation
cmu_playing_with_food cmu_play_fusion cmu_stretch berkeley_gnm_recon berkeley_gnm_cory_hall berkeley_gnm_sac_son droid
fmb_dataset dobbe rh20t tdroid_carrot_in_bowl tdroid_pour_corn_in_pot tdroid_flip_pot_upright
tdroid_move_object_onto_plate tdroid_knock_object_over tdroid_cover_object_with_towel droid_wipe
libero_spatial_no_noops libero_object_no_noops libero_goal_no_noops libero_10_no_noops""".split()


def _leaves(node: dict, prefix: str = "") -> dict[str, dict]:
    """Flatten a tfds features.json into {path: leaf} without tfds (an independent reading of the schema)."""
    if "featuresDict" in node:
        out = {}
        for k, v in node["featuresDict"]["features"].items():
            out.update(_leaves(v, f"{prefix}/{k}" if prefix else k))
        return out
    for wrapper in ("sequence", "dataset"):
        if wrapper in node:
            return _leaves(node[wrapper]["feature"], prefix)
    return {prefix: node}


def _schema_dirs() -> dict[str, Path]:
    found = {}
    for root in (BUNDLED_SCHEMAS, SHARED_SCHEMAS):
        for f in sorted(root.glob("*/*/features.json")) if root.is_dir() else []:
            found[f.parent.parent.name] = f.parent
    return found


def test_registry_covers_openvla_eef_pos_datasets():
    reg = Registry.load()
    assert len(OPENVLA_EEF_POS) == 67
    assert sorted(OPENVLA_EEF_POS) == reg.names()


def test_schema_datasets_registered_with_matching_keys():
    reg = Registry.load()
    schemas = _schema_dirs()
    if not SHARED_SCHEMAS.is_dir():
        if IN_CI:
            shared_schemas_missing("checking the registry against the real schemas")
        print(f"only bundled schemas checked: {SHARED_SCHEMAS} is absent")
    assert len(schemas) >= 4
    for name, d in schemas.items():
        spec = reg.get(name)
        info = json.loads((d / "dataset_info.json").read_text())
        assert spec.tfds_name == info["name"], name
        leaves = _leaves(json.loads((d / "features.json").read_text()))
        for key in spec.step_keys(with_images=True):
            assert f"steps/{key}" in leaves, f"{name}: registry key {key!r} not in the schema"
        if spec.wrist_image:
            assert f"steps/observation/{spec.wrist_image}" in leaves, name
        if spec.success_key:
            assert spec.success_key in leaves, name


def test_openvla_layout_facts():
    reg = Registry.load()
    bridge = reg.get("bridge_orig")
    assert [op.name for op in bridge.standardize] == ["drop_first", "action", "relabel_from_state"]
    assert bridge.tfds_name == "bridge_dataset" and bridge.primary_image == "image_0"
    assert reg.get("fmb_dataset").tfds_name == "fmb"
    assert reg.get("bridge_oxe").tfds_name == "bridge"
    assert reg.get("language_table").language_decode == "codepoints"
    grip_ops = lambda n: [o.name for o in next(op for op in reg.get(n).standardize if op.name == "action").parts[-1].ops]  # noqa: E731
    for n in ("fractal20220817_data", "kuka", "jaco_play", "berkeley_autolab_ur5", "nyu_door_opening_surprising_effectiveness"):
        assert grip_ops(n) == ["rel2abs"], n
    assert grip_ops("bridge_orig") == ["binarize"]
    assert grip_ops("libero_10_no_noops") == ["clip", "invert"]
    assert reg.get("kuka").success_key == "success"
    for n in reg.names():
        assert reg.get(n).action_normalization_mask == (True,) * 6 + (False,)


def test_unknown_dataset_lists_closest_and_how_to_register():
    reg = Registry.load()
    with pytest.raises(UnknownDatasetError) as e:
        reg.get("bridge_orgi")
    msg = str(e.value)
    assert msg.index("bridge_orig") < msg.index("fractal20220817_data")
    assert "--registry" in msg and "datasets:" in msg


def test_custom_dataset_by_yaml(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        """
datasets:
  my_arm:
    images: {primary: cam}
    standardize:
      - action:
          - {key: action, cols: [0, 6]}
          - {key: action, cols: [-1, null], ops: [{clip: [0, 1]}, invert]}
"""
    )
    reg = Registry.load([extra])
    spec = reg.get("my_arm")
    assert spec.tfds_name == "my_arm" and spec.language_key == "language_instruction"
    assert "bridge_orig" in reg.names()


def test_bad_registry_entry_is_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets:\n  x:\n    standardize:\n      - action:\n          - {key: a, ops: [flip]}\n")
    with pytest.raises(RegistryError, match="unknown part op 'flip'"):
        Registry.load([bad])
