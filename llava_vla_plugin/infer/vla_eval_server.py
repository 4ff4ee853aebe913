"""A vla-eval model server for this project's checkpoints (vla-eval's websocket + msgpack protocol).

    python -m llava_vla_plugin.infer.vla_eval_server --checkpoint runs/ov-vla --unnorm-key libero_spatial
    vla-eval run -c configs/vla_eval/libero_spatial.yaml --no-docker      # in another shell

It binds 127.0.0.1 unless --host says otherwise (vla-eval's own run_server defaults to 0.0.0.0).

The model side of OpenVLA's evaluation protocol (openvla/experiments/robot/: run_libero_eval.py,
robot_utils.py, openvla_utils.py; and its SimplerEnv policy), done exactly here:
  1. image: OpenVLA re-encodes the frame as JPEG and decodes it (`tf.image.encode_jpeg`, quality
     95) because training frames were JPEG bytes in RLDS. Our training decodes the stored JPEG bytes
     (data_tools copies them untouched), so the frame gets the same round trip: PIL JPEG at
     data_tools.images.JPEG_QUALITY (95), decoded to RGB. OpenVLA then resizes to 224 for its
     Prismatic processor; we do not: VLAPolicy hands the decoded frame to upstream's
     process_images exactly as the training collator does (resize there, with the checkpoint's
     image_aspect_ratio). The 180-degree rotation of LIBERO frames is the environment's job
     (vla-eval's LIBERO benchmark, and our Lift benchmark, send rotated frames).
  2. center crop (only for checkpoints trained with random-crop augmentation, OpenVLA's
     `center_crop=True`): keep the central 90 % of the area (side sqrt(0.9)) and resize back
     (bilinear, as tf.image.crop_and_resize).
  3. unnorm_key: OpenVLA's rule: when the key is absent from the statistics and `<key>_no_noops`
     is present (its LIBERO checkpoints), use that; a single-dataset checkpoint may omit the key.
  4. decoding: VLAPolicy's greedy, constrained decoding and OpenVLA's BOUNDS_Q99 un-normalization.
  5. gripper, per benchmark (--gripper):
       libero: dataset [0 close, 1 open] -> robosuite [-1 open, +1 close]:
               OpenVLA's normalize_gripper_action(binarize=True) then invert_gripper_action,
               i.e. g' = -sign(2 g - 1);
       raw:    the dataset value is sent as is (vla-eval's SimplerEnv benchmark turns it into the
               robot's command itself: sticky for Google Robot, binary for WidowX).
  6. rotation (--rotation): `as_is` (LIBERO: the dataset's delta axis-angle is the controller's
     input) or `euler_to_axisangle` (SimplerEnv: fractal/bridge rotations are roll-pitch-yaw;
     OpenVLA's SimplerEnv policy turns them into an axis-angle vector, transforms3d's
     euler2axangle with static xyz axes).
  7. chunks: when the checkpoint predicts [H, D] the conversions apply per row and vla-eval's
     PredictModelServer plays the chunk out (chunk_size defaults to H, --action-ensemble).
  8. the wrist view and the state, for a checkpoint trained on them (vla_inputs.json; core/inputs.py): the wrist
     image is `images[--wrist-key]` (LIBERO: "wrist", with the benchmark's `send_wrist_image: true`), flipped upright
     by vla-eval as the agentview is, then given the same JPEG round trip and crop; the state is `states` (LIBERO:
     `send_state: true`, 8-d [eef pos3, axis-angle3, gripper qpos2], vla-eval turning robosuite's quaternion into
     axis-angle as LIBERO's converted data holds it), normalized with the --unnorm-key dataset's proprio statistics.
     OpenVLA's LIBERO layout has 9 values ([EEF_state, None, gripper_state]: a zero column at 6); the statistics
     name that padding and the pipeline puts the zero back (core/inputs.with_padding), any other width is refused.
     A checkpoint that needs either and gets an observation without it is refused (ObservationError naming the
     benchmark parameter to set): nothing is zero-filled. A checkpoint that does not use them ignores them.
A bad observation (no image, unknown image key, wrong shape/dtype, no instruction) raises
ObservationError: vla-eval answers that request with its protocol's ERROR message and the server
keeps serving.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

from vla_eval.model_servers.base import SessionContext
from vla_eval.model_servers.chunking import ActionChunkBuffer, get_ensemble_fn
from vla_eval.model_servers.predict import PredictModelServer
from vla_eval.specs import (GRIPPER_CLOSE_POS, IMAGE_RGB, LANGUAGE, POSITION_DELTA, ROTATION_AA, ROTATION_EULER,
                            STATE_EEF_POS_AA_GRIP, DimSpec)

from data_tools.images import JPEG_QUALITY
from llava_vla_plugin.core.normalization import UnnormKeyError, check_serving_statistics, resolve_unnorm_key_no_noops

log = logging.getLogger("llava_vla_plugin.infer.vla_eval_server")

GRIPPER_MODES = ("libero", "raw")
ROTATION_MODES = ("as_is", "euler_to_axisangle")
CENTER_CROP_AREA = 0.9


class ObservationError(ValueError):
    """The observation cannot be turned into model input (sent back as the protocol's ERROR)."""


# ---- the conventions, as pure functions (each tested against a hand computation) -------------------
# OpenVLA's key rules, `<key>_no_noops` for an absent `<key>` included: normalization.py's, shared with /act.
unnorm_key_with_fallback = resolve_unnorm_key_no_noops


def jpeg_roundtrip(image: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """Encode as JPEG and decode: the frames the model was trained on were JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        return np.asarray(im.convert("RGB"))


def center_crop(image: np.ndarray, area: float = CENTER_CROP_AREA) -> np.ndarray:
    """OpenVLA's eval-time crop for augmentation-trained checkpoints: central `area`, resized back."""
    h, w = image.shape[:2]
    ch, cw = int(round(h * area ** 0.5)), int(round(w * area ** 0.5))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = Image.fromarray(image[top:top + ch, left:left + cw])
    return np.asarray(crop.resize((w, h), resample=Image.Resampling.BILINEAR))


def gripper_to_env(actions: np.ndarray, mode: str) -> np.ndarray:
    """Gripper (last column) from the dataset's convention to the benchmark's (see module doc, 5)."""
    out = np.array(actions, dtype=np.float64, copy=True)
    if mode == "libero":
        out[..., -1] = -np.sign(2.0 * out[..., -1] - 1.0)
    elif mode != "raw":
        raise ValueError(f"gripper mode must be one of {GRIPPER_MODES}, got {mode!r}")
    return out


def rotation_to_env(actions: np.ndarray, mode: str) -> np.ndarray:
    """Columns 3:6 from the dataset's rotation to the benchmark's (see module doc, 6)."""
    out = np.array(actions, dtype=np.float64, copy=True)
    if mode == "euler_to_axisangle":
        from scipy.spatial.transform import Rotation

        flat = out.reshape(-1, out.shape[-1])
        flat[:, 3:6] = Rotation.from_euler("xyz", flat[:, 3:6]).as_rotvec()  # static x, y, z = transforms3d 'sxyz'
        out = flat.reshape(out.shape)
    elif mode != "as_is":
        raise ValueError(f"rotation mode must be one of {ROTATION_MODES}, got {mode!r}")
    return out


def observation_image(obs: Mapping[str, Any], image_key: str | None) -> np.ndarray:
    """The one camera image the model gets, validated."""
    images = obs.get("images") if isinstance(obs, Mapping) else None
    if not isinstance(images, Mapping) or not images:
        raise ObservationError("observation has no images: expected {'images': {'<camera>': HxWx3 uint8}, ...}")
    if image_key is None:
        if len(images) != 1:
            raise ObservationError(f"observation has cameras {sorted(images)}; start the server with --image-key "
                                   "to choose the one the model was trained on")
        image_key = next(iter(images))
    if image_key not in images:
        raise ObservationError(f"observation has no camera {image_key!r}; it has {sorted(images)} "
                               "(set --image-key to one of them)")
    img = np.asarray(images[image_key])
    if img.ndim != 3 or img.shape[-1] != 3 or min(img.shape[:2]) < 1:
        raise ObservationError(f"image {image_key!r} has shape {img.shape}; expected (H, W, 3)")
    if img.dtype != np.uint8:
        raise ObservationError(f"image {image_key!r} has dtype {img.dtype}; expected uint8 0..255")
    return np.ascontiguousarray(img)


def model_image(obs_image: np.ndarray, jpeg: bool = True, crop: bool = False) -> np.ndarray:
    """The documented transform from the benchmark's image to the model's input (module doc, 1-2)."""
    img = jpeg_roundtrip(obs_image) if jpeg else obs_image
    return center_crop(img) if crop else img


class LlavaVLAModelServer(PredictModelServer):
    """Serves a VLAPolicy (or any object with `predict_action(image, instruction, unnorm_key)` and
    `norm_stats`) to vla-eval benchmarks. See the module docstring for the conventions."""

    def __init__(self, policy, *, unnorm_key: str | None = None, gripper: str = "libero", rotation: str = "as_is",
                 jpeg: bool = True, center_crop: bool = False, image_key: str | None = "agentview",
                 chunk_size: int | None = None, action_ensemble: str = "newest", trace_dir: str | None = None,
                 observation_params: Mapping[str, Any] | None = None, wrist_key: str = "wrist",
                 state_key: str = "states") -> None:
        super().__init__(chunk_size=chunk_size, action_ensemble=action_ensemble)
        if gripper not in GRIPPER_MODES:
            raise ValueError(f"gripper must be one of {GRIPPER_MODES}, got {gripper!r}")
        if rotation not in ROTATION_MODES:
            raise ValueError(f"rotation must be one of {ROTATION_MODES}, got {rotation!r}")
        self.policy = policy
        self.unnorm_key = unnorm_key_with_fallback(policy.norm_stats, unnorm_key)  # a bad key fails at start
        if self.unnorm_key != unnorm_key:
            log.info("unnorm_key %r -> %r (OpenVLA's rule)", unnorm_key, self.unnorm_key)
        self.gripper, self.rotation, self.jpeg, self.crop = gripper, rotation, jpeg, center_crop
        self.image_key = image_key
        self.wrist_key, self.state_key = wrist_key, state_key
        inputs = getattr(policy, "inputs", None)  # core/inputs.InputConfig of a VLAPolicy; other policies: one image
        self.needs_wrist = bool(inputs is not None and inputs.wrist)
        self.needs_state = bool(inputs is not None and inputs.proprio)
        self.trace_dir = Path(trace_dir) if trace_dir else None
        self._observation_params = dict(observation_params or {})
        self._calls = 0
        self.latencies_s: list[float] = []

    # -- declarations sent in vla-eval's HELLO ------------------------------------------------------
    def get_action_spec(self) -> dict[str, DimSpec]:
        rot = ROTATION_AA if self.rotation == "euler_to_axisangle" or self.gripper == "libero" else ROTATION_EULER
        return {"position": POSITION_DELTA, "rotation": rot, "gripper": GRIPPER_CLOSE_POS}

    def get_observation_spec(self) -> dict[str, DimSpec]:
        spec = {self.image_key or "image": IMAGE_RGB, "language": LANGUAGE}
        if self.needs_wrist:
            spec[self.wrist_key] = IMAGE_RGB
        if self.needs_state:
            spec["state"] = STATE_EEF_POS_AA_GRIP
        return spec

    def get_observation_params(self) -> dict[str, Any]:
        return dict(self._observation_params)

    # -- inference ------------------------------------------------------------------------------
    def predict(self, obs, ctx: SessionContext) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        image = observation_image(obs, self.image_key)
        text = obs.get("task_description")
        if not isinstance(text, str) or not text.strip():
            raise ObservationError(f"observation has no task_description (got {text!r}); the model needs the instruction")
        inp = model_image(image, self.jpeg, self.crop)
        extra, traced = {}, {}
        if self.needs_wrist:
            if self.wrist_key not in (obs.get("images") or {}):
                raise ObservationError(f"this checkpoint was trained with the wrist view, but the observation has cameras "
                                       f"{sorted(obs.get('images') or {})} and no {self.wrist_key!r} (LIBERO and Lift: set "
                                       "the benchmark's send_wrist_image: true; or --wrist-key)")
            traced["obs_wrist_image"] = observation_image(obs, self.wrist_key)
            extra["wrist_image"] = traced["model_wrist_image"] = model_image(traced["obs_wrist_image"], self.jpeg,
                                                                             self.crop)
        if self.needs_state:
            state = obs.get(self.state_key)
            if state is None:
                raise ObservationError(f"this checkpoint was trained with the robot state, but the observation has no "
                                       f"{self.state_key!r} (LIBERO and Lift: set the benchmark's send_state: true)")
            extra["proprio"] = traced["state"] = np.asarray(state, dtype=np.float64).reshape(-1)
        raw = np.asarray(self.policy.predict_action(inp, text, unnorm_key=self.unnorm_key, **extra), dtype=np.float64)
        if raw.ndim not in (1, 2):
            raise RuntimeError(f"the policy returned actions of shape {raw.shape}; expected (D,) or (H, D)")
        actions = gripper_to_env(rotation_to_env(raw, self.rotation), self.gripper)
        if actions.ndim == 2 and self._get_chunk_size(ctx) is None:
            self._adopt_chunk(actions.shape[0], ctx)
        self.latencies_s.append(time.perf_counter() - t0)
        if self.trace_dir is not None:
            extra = dict(traced)  # the wrist view (as received, as given to the model) and the state, where used
            # debugging only: the tokens, by a second greedy pass (token representations; parallel_l1 has none)
            if hasattr(self.policy, "predict_action_ids") and getattr(self.policy, "n_action_tokens", 1):
                batched = {"wrist_images": [extra["model_wrist_image"]]} if self.needs_wrist else {}
                if self.needs_state:
                    batched.update(states=[extra["state"]], unnorm_key=self.unnorm_key)
                extra["action_ids"] = self.policy.predict_action_ids([inp], [text], **batched)[0]
            self._trace(obs_image=image, model_image=inp, instruction=text, model_output=raw, sent=actions, **extra)
        return {"actions": actions.astype(np.float32)}

    def _adopt_chunk(self, horizon: int, ctx: SessionContext) -> None:
        """A chunked checkpoint served without --chunk-size: play every predicted chunk out."""
        self.chunk_size = horizon
        self._chunk_buffers[ctx.session_id] = ActionChunkBuffer(horizon, get_ensemble_fn(self.action_ensemble,
                                                                                       self.ema_alpha))

    def _trace(self, **arrays) -> None:
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        np.savez(self.trace_dir / f"call{self._calls:05d}.npz", unnorm_key=self.unnorm_key, **arrays)
        self._calls += 1


# ---- command line ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava_vla_plugin.infer.vla_eval_server",
                                description="Serve a llava-vla checkpoint to vla-eval benchmarks (websocket + msgpack).")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json, dataset_statistics.json)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--unnorm-key", default=None, help="dataset whose statistics un-normalize actions "
                   "(<key>_no_noops is used when <key> is absent; may be omitted for a one-dataset checkpoint)")
    p.add_argument("--gripper", choices=GRIPPER_MODES, default="libero",
                   help="libero: [0 close,1 open] -> [-1 open,+1 close] (robosuite); raw: SimplerEnv (default libero)")
    p.add_argument("--rotation", choices=ROTATION_MODES, default="as_is",
                   help="as_is (LIBERO) or euler_to_axisangle (SimplerEnv) (default as_is)")
    p.add_argument("--no-jpeg", action="store_true", help="skip the JPEG round trip (only for checkpoints trained on "
                   "undecoded raw frames)")
    p.add_argument("--center-crop", action="store_true", help="OpenVLA's eval crop; only for checkpoints trained "
                   "with random-crop augmentation")
    p.add_argument("--image-key", default="agentview", help="camera the model sees (default agentview; "
                   "SimplerEnv sends 'primary')")
    p.add_argument("--wrist-key", default="wrist", help="camera holding the wrist view, for a checkpoint trained with it "
                   "(default wrist: vla-eval's LIBERO with send_wrist_image: true)")
    p.add_argument("--state-key", default="states", help="observation key of the robot state, for a checkpoint trained "
                   "with it (default states: vla-eval's LIBERO with send_state: true)")
    p.add_argument("--chunk-size", type=int, default=None, help="actions played per prediction (default: all of a "
                   "predicted chunk, 1 for single-step checkpoints)")
    p.add_argument("--action-ensemble", default="newest", choices=("newest", "average", "ema"))
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="bfloat16 / float16 / float32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--trace-dir", default=None, help="save every call's input image, model image (the wrist view's "
                   "and the state too, for a checkpoint that uses them), model output and sent action as .npz "
                   "(debugging conventions)")
    p.add_argument("--dry-run", action="store_true", help="check the arguments, the checkpoint's statistics and "
                   "--unnorm-key, print the settings; load no weights")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = {k: v for k, v in vars(args).items() if k != "dry_run"}
    try:  # before any weight loads (and in --dry-run): the statistics file and the key
        _, unnorm_key = check_serving_statistics(args.checkpoint, args.unnorm_key)
    except (OSError, ValueError, UnnormKeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps({"would_serve": settings, "unnorm_key_resolved": unnorm_key, "checkpoint_exists": True}))
        return 0
    from llava_vla_plugin.infer.pipeline import VLAPolicy

    try:
        policy = VLAPolicy.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype)
        server = LlavaVLAModelServer(policy, unnorm_key=args.unnorm_key, gripper=args.gripper, rotation=args.rotation,
                                     jpeg=not args.no_jpeg, center_crop=args.center_crop, image_key=args.image_key,
                                     chunk_size=args.chunk_size, action_ensemble=args.action_ensemble,
                                     trace_dir=args.trace_dir, wrist_key=args.wrist_key, state_key=args.state_key)
    except (OSError, ValueError, UnnormKeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from vla_eval.model_servers.serve import serve

    log.info("serving %s (unnorm_key=%s, gripper=%s, rotation=%s) on ws://%s:%d", args.checkpoint, server.unnorm_key,
             args.gripper, args.rotation, args.host, args.port)
    try:
        serve(server, host=args.host, port=args.port)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
