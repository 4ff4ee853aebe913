"""The vla-eval model server: each convention against a hand computation, and the protocol on loopback.

The protocol tests run vla-eval's own serve_async and Connection (websocket + msgpack) with a
small stand-in policy, because what is under test there is the server's handling (errors,
chunks, conversions), not the model; the real checkpoint goes through the same server in
test_closed_loop.py.
"""
from __future__ import annotations

import io
import json
import math

import anyio
import numpy as np
import pytest
from PIL import Image

from data_tools.images import frame_jpeg
from llava_vla_plugin.core.normalization import UnnormKeyError
from llava_vla_plugin.infer.vla_eval_server import (LlavaVLAModelServer, ObservationError, build_parser, center_crop,
                                              gripper_to_env, jpeg_roundtrip, main, model_image, observation_image,
                                              rotation_to_env, unnorm_key_with_fallback)

STATS = {"q01": [0.0] * 7, "q99": [1.0] * 7}


# ---- conventions ---------------------------------------------------------------------------------
def test_unnorm_key_no_noops_fallback():
    stats = {"libero_spatial_no_noops": {"action": STATS}, "libero_goal": {"action": STATS},
             "libero_goal_no_noops": {"action": STATS}}
    assert unnorm_key_with_fallback(stats, "libero_spatial") == "libero_spatial_no_noops"
    assert unnorm_key_with_fallback(stats, "libero_goal") == "libero_goal"  # the exact key wins, as in OpenVLA
    with pytest.raises(UnnormKeyError, match="libero_10"):
        unnorm_key_with_fallback(stats, "libero_10")
    with pytest.raises(UnnormKeyError, match="pass unnorm_key"):
        unnorm_key_with_fallback(stats, None)
    assert unnorm_key_with_fallback({"only_no_noops": {"action": STATS}}, None) == "only_no_noops"


def test_gripper_libero_matches_openvla_normalize_then_invert():
    a = np.zeros((5, 7))
    a[:, -1] = [0.0, 1.0, 0.3, 0.8, 0.5]
    out = gripper_to_env(a, "libero")
    # OpenVLA: g <- 2g - 1, g <- sign(g) (binarize), g <- -g (invert): 0 close -> +1, 1 open -> -1
    assert out[:, -1].tolist() == [1.0, -1.0, 1.0, -1.0, -0.0]
    assert np.array_equal(out[:, :6], a[:, :6])
    assert np.array_equal(gripper_to_env(a, "raw"), a)
    with pytest.raises(ValueError, match="gripper mode"):
        gripper_to_env(a, "sticky")


def _rot(axis: str, t: float) -> np.ndarray:
    c, s = math.cos(t), math.sin(t)
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]), "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


def test_rotation_euler_to_axisangle_by_hand():
    roll, pitch, yaw = 0.3, -0.2, 0.5
    R = _rot("z", yaw) @ _rot("y", pitch) @ _rot("x", roll)  # transforms3d 'sxyz' (static axes x, then y, then z)
    angle = math.acos((np.trace(R) - 1) / 2)
    axis = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]]) / (2 * math.sin(angle))
    a = np.array([0.1, 0.2, 0.3, roll, pitch, yaw, 1.0])
    out = rotation_to_env(a, "euler_to_axisangle")
    np.testing.assert_allclose(out[3:6], axis * angle, atol=1e-12)
    assert np.array_equal(out[[0, 1, 2, 6]], a[[0, 1, 2, 6]])
    chunk = rotation_to_env(np.stack([a, a]), "euler_to_axisangle")
    np.testing.assert_allclose(chunk[1, 3:6], axis * angle, atol=1e-12)
    assert np.array_equal(rotation_to_env(a, "as_is"), a)


def test_model_image_equals_a_training_frame_decoded():
    """The eval image equals what training would see had the frame been stored by data_tools."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    stored, how = frame_jpeg(frame, flip_channels=False)
    assert how == "encoded"
    trained_on = np.asarray(Image.open(io.BytesIO(stored)).convert("RGB"))
    assert np.array_equal(model_image(frame), trained_on)
    assert not np.array_equal(model_image(frame), frame)  # the round trip is not a no-op
    assert np.array_equal(model_image(frame, jpeg=False), frame)


def test_center_crop_by_hand():
    img = np.zeros((100, 100, 3), dtype=np.uint8)
    img[2:97, 2:97] = 200  # round(100 * sqrt(0.9)) = 95: the crop keeps rows/cols 2..96
    out = center_crop(img)
    assert out.shape == img.shape
    assert (out == 200).all()
    assert np.array_equal(jpeg_roundtrip(img).shape, img.shape)


@pytest.mark.parametrize("obs, message", [
    ({"task_description": "x"}, "no images"),
    ({"images": {}, "task_description": "x"}, "no images"),
    ({"images": {"wrist": np.zeros((8, 8, 3), np.uint8)}, "task_description": "x"}, "no camera 'agentview'"),
    ({"images": {"agentview": np.zeros((8, 8), np.uint8)}, "task_description": "x"}, r"shape \(8, 8\)"),
    ({"images": {"agentview": np.zeros((8, 8, 3), np.float32)}, "task_description": "x"}, "dtype float32"),
])
def test_observation_errors(obs, message):
    with pytest.raises(ObservationError, match=message):
        observation_image(obs, "agentview")


# ---- the protocol on loopback ---------------------------------------------------------------------
class StandInPolicy:
    """Returns fixed un-normalized actions and records what it was given."""

    def __init__(self, actions):
        self.actions = np.asarray(actions, dtype=np.float64)
        self.norm_stats = {"libero_object_no_noops": {"action": STATS}}
        self.calls = []

    def predict_action(self, image, instruction, unnorm_key=None):
        self.calls.append((np.asarray(image).copy(), instruction, unnorm_key))
        return self.actions


def _session(server, observations):
    """Serve on an ephemeral loopback port; send the observations through vla-eval's Connection."""
    from vla_eval.connection import Connection
    from vla_eval.model_servers.serve import serve_async

    results = []

    async def run():
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve_async, server, "127.0.0.1", 0)
            conn = Connection(f"ws://127.0.0.1:{port}", timeout=30)
            await conn.connect()
            results.append(conn.server_info)
            await conn.start_episode({"task": {"name": "t"}})
            for obs in observations:
                try:
                    results.append((await conn.act(obs))["actions"])
                except RuntimeError as e:
                    results.append(str(e))
            await conn.end_episode({})
            await conn.close()
            tg.cancel_scope.cancel()

    anyio.run(run)
    return results


def _obs(seed=0, **kw):
    img = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return {"images": {"agentview": img}, "task_description": "pick up the cube", **kw}


def test_server_protocol_errors_then_serves():
    policy = StandInPolicy([0.1, -0.2, 0.3, 0.01, 0.02, -0.03, 0.9])
    server = LlavaVLAModelServer(policy, unnorm_key="libero_object")
    assert server.unnorm_key == "libero_object_no_noops"
    good = _obs()
    hello, *answers = _session(server, [
        {"task_description": "x"},
        {"images": {"wrist": good["images"]["agentview"]}, "task_description": "x"},
        {"images": {"agentview": np.zeros((4, 4, 4), np.uint8)}, "task_description": "x"},
        {"images": good["images"], "task_description": ""},
        good,
    ])
    assert hello["action_spec"]["gripper"]["format"] == "binary_close_positive"
    for err, what in zip(answers[:4], ["no images", "no camera 'agentview'", "shape (4, 4, 4)", "no task_description"]):
        assert isinstance(err, str) and "Server error" in err and "ObservationError" in err and what in err, err
    # the server is still up, and converted the action by hand's rule: gripper 0.9 (open) -> -1
    np.testing.assert_allclose(answers[4], [0.1, -0.2, 0.3, 0.01, 0.02, -0.03, -1.0], rtol=1e-6)
    assert len(policy.calls) == 1
    image, text, key = policy.calls[0]
    assert text == "pick up the cube" and key == "libero_object_no_noops"
    assert np.array_equal(image, jpeg_roundtrip(good["images"]["agentview"]))


def test_server_plays_out_predicted_chunks():
    chunk = np.array([[0.1 * h, 0, 0, 0, 0, 0, h % 2] for h in range(3)], dtype=np.float64)
    policy = StandInPolicy(chunk)
    _, *answers = _session(LlavaVLAModelServer(policy, unnorm_key="libero_object"), [_obs(i) for i in range(4)])
    expected = gripper_to_env(chunk, "libero")
    for got, want in zip(answers[:3], expected):
        np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(answers[3], expected[0], atol=1e-6)  # a new chunk after three steps
    assert len(policy.calls) == 2


def test_cli_defaults_bind_loopback_and_dry_run(capsys, tmp_path):
    args = build_parser().parse_args(["--checkpoint", str(tmp_path)])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.gripper == "libero" and args.rotation == "as_is"
    assert args.image_key == "agentview" and not args.center_crop and not args.no_jpeg
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "dataset_statistics.json").write_text(json.dumps({"libero_spatial_no_noops": {"action": STATS}}))
    assert main(["--checkpoint", str(tmp_path), "--dry-run"]) == 0  # one dataset: no --unnorm-key needed
    assert '"host": "127.0.0.1"' in capsys.readouterr().out
