"""A real closed-loop task that runs on CPU: robosuite's Lift as a vla-eval StepBenchmark.

    benchmarks:
      - benchmark: "llava_vla_plugin.apps.sim_lift:LiftBenchmark"
        params: {max_steps: 40, send_wrist_image: true, send_state: true}

Why this exists: LIBERO and SimplerEnv need their own installs and assets (LIBERO fetches scenes
from the Hugging Face hub), so CI cannot run them. Lift is LIBERO's embodiment and action space
(Panda, OSC_POSE: 7-d delta end-effector [dx, dy, dz, d-axis-angle x3, gripper], robosuite's
controller as LIBERO pins it, 1.4.x) with assets inside the robosuite wheel, so the whole loop
(orchestrator -> websocket/msgpack protocol -> our model server -> env) runs here, on CPU.

Conventions (the same as vla-eval's LIBERO benchmark, so a LIBERO-trained server sees the same
inputs, and the same on both sides of `make eval-demo`: recording and evaluation share env_image and
lift_state):
  * image: agentview 256x256, rotated 180 degrees (`frame[::-1, ::-1]`): robosuite renders with
    OpenGL's origin, and OpenVLA's modified LIBERO RLDS stores the rotated frame;
  * wrist image (`send_wrist_image`, LIBERO's parameter; off by default, as LIBERO's): robosuite's eye-in-hand
    camera `robot0_eye_in_hand`, 256x256, sent as `images["wrist"]` with the same 180-degree rotation (env_image
    says why it is the same transform); rendered only when asked for (a second camera costs a second render
    per step);
  * action: 7 floats, gripper discretised to -1 (open) / +1 (close) as LIBERO does (sign; 0 -> +1);
  * success: robosuite's `_check_success()` (cube lifted 4 cm above the table); done = success;
  * `states` (`send_state`, LIBERO's parameter; off by default, as LIBERO's): 8-d [eef pos 3, eef axis-angle 3,
    gripper qpos 2] (lift_state; what vla-eval's LIBERO benchmark sends, from robosuite's `robot0_eef_pos`,
    `robot0_eef_quat` and `robot0_gripper_qpos` observations, which Lift has as LIBERO does);
    `object_pos` (the cube) is sent only with send_object_state, for the scripted controller.
Rendering is MuJoCo through EGL (`MUJOCO_GL=egl`): on a CPU host that is Mesa's software EGL
(Debian: libegl1 + libegl-mesa0). vla-eval's `--render cpu` would switch MuJoCo to OSMesa, which
these hosts lack, so this benchmark uses EGL for both modes. A host that cannot render gets
RenderUnavailableError (naming MUJOCO_GL) from a time-limited probe, never a hang.
`hard_reset=False`: robosuite then resets by restoring state instead of rebuilding the model
(~0.05 s instead of ~5-11 s per episode).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from vla_eval.benchmarks.base import StepBenchmark, StepResult
from vla_eval.model_servers.predict import PredictModelServer
from vla_eval.specs import (GRIPPER_CLOSE_POS, IMAGE_RGB, LANGUAGE, POSITION_DELTA, ROTATION_AA, STATE_EEF_POS_AA_GRIP,
                            DimSpec)
from vla_eval.types import Action, EpisodeResult, Observation, Task

log = logging.getLogger(__name__)

INSTRUCTION = "lift the red cube"
RESOLUTION = 256
PRIMARY_CAMERA = "agentview"
WRIST_CAMERA = "robot0_eye_in_hand"  # robosuite's camera on the Panda's hand (LIBERO's wrist view)
STATE_DIM = 8
ACTION_DIM = 7
RENDER_ENV = {"MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl"}
RENDER_PROBE_TIMEOUT_S = 120
EGL_PACKAGES = "libegl1 libegl-mesa0"


class RenderUnavailableError(RuntimeError):
    """MuJoCo cannot render offscreen on this host."""


_PROBE = r"""
import mujoco, numpy as np
m = mujoco.MjModel.from_xml_string('<mujoco><worldbody><light pos="0 0 1"/><geom size=".1"/></worldbody></mujoco>')
r = mujoco.Renderer(m, 16, 16); d = mujoco.MjData(m); mujoco.mj_forward(m, d); r.update_scene(d)
print(int(r.render().sum() > 0))
"""


def check_render(timeout: float = RENDER_PROBE_TIMEOUT_S) -> None:
    """Render one frame in a child process with MUJOCO_GL=egl; raise RenderUnavailableError if it fails.

    A child process because a broken GL stack can hang or abort the process that tries it.
    """
    env = {**os.environ, **RENDER_ENV}
    hint = (f"MuJoCo cannot render offscreen with MUJOCO_GL={env['MUJOCO_GL']}. On a CPU host install Mesa's EGL "
            f"(Debian/Ubuntu: apt-get install {EGL_PACKAGES}); on a GPU host the NVIDIA driver's EGL. "
            "Check with: MUJOCO_GL=egl python -c 'import mujoco; mujoco.Renderer(mujoco.MjModel.from_xml_string("
            "\"<mujoco/>\"))'")
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RenderUnavailableError(f"{hint}\n(the render probe did not finish in {timeout:.0f} s)") from None
    if proc.returncode != 0 or proc.stdout.strip() != "1":
        raise RenderUnavailableError(f"{hint}\n(probe output: {(proc.stderr or proc.stdout).strip()[-600:]})")


def _quiet_robosuite() -> None:
    # robosuite warns at import that no private macro file exists: benign for us (defaults are what we want).
    logging.getLogger("robosuite_logs").setLevel(logging.ERROR)


def quat_to_axisangle(quat: np.ndarray) -> np.ndarray:
    """robosuite's [x, y, z, w] quaternion -> axis-angle (robosuite.utils.transform_utils' formula)."""
    q = np.asarray(quat, dtype=np.float64).copy()
    q[3] = np.clip(q[3], -1.0, 1.0)
    den = np.sqrt(1.0 - q[3] * q[3])
    if np.isclose(den, 0.0):
        return np.zeros(3)
    return q[:3] * 2.0 * np.arccos(q[3]) / den


def env_image(raw_frame: np.ndarray) -> np.ndarray:
    """The documented image transform, for both cameras: the rendered frame rotated 180 degrees (LIBERO's).

    The wrist (eye-in-hand) view takes the same transform as agentview: robosuite renders every camera with
    OpenGL's bottom-left origin (robosuite.macros.IMAGE_CONVENTION = "opengl", no per-camera difference), and
    LIBERO flips both views the same way: vla-eval's LIBERO benchmark (preprocess_libero_image on
    `robot0_eye_in_hand_image` as on `agentview_image`), OpenVLA-OFT's get_libero_wrist_image ("rotate 180
    degrees to match train preprocessing") and OpenVLA's modified LIBERO RLDS, which stores both rotated.
    """
    return np.ascontiguousarray(np.asarray(raw_frame)[::-1, ::-1])


def lift_state(obs: dict) -> np.ndarray:
    """The robot state sent with send_state and recorded with the demonstrations: 8-d float32
    [eef pos 3, eef axis-angle 3, gripper qpos 2], LIBERO's (vla-eval's LiberoBenchmark._proprio_state and
    OpenVLA's modified LIBERO RLDS `observation/state` are this layout), from robosuite's observations."""
    return np.concatenate([obs["robot0_eef_pos"], quat_to_axisangle(obs["robot0_eef_quat"]),
                           obs["robot0_gripper_qpos"]]).astype(np.float32)


def discretise_gripper(action: np.ndarray) -> np.ndarray:
    """LIBERO's env side: gripper < 0 -> -1 (open), else +1 (close)."""
    out = np.asarray(action, dtype=np.float64).copy()
    out[-1] = -1.0 if out[-1] < 0 else 1.0
    return out


def make_lift_env(seed: int = 0, camera: bool = True, resolution: int = RESOLUTION, wrist: bool = False):
    """robosuite Lift, Panda, OSC_POSE, 20 Hz; ignore_done (the harness owns the step limit). Renders agentview
    (`agentview_image`), and with wrist=True the eye-in-hand camera too (`robot0_eye_in_hand_image`)."""
    os.environ.update(RENDER_ENV)
    _quiet_robosuite()
    import robosuite as suite
    from robosuite import load_controller_config

    env = suite.make("Lift", robots="Panda", controller_configs=load_controller_config(default_controller="OSC_POSE"),
                     has_renderer=False, has_offscreen_renderer=camera, use_camera_obs=camera,
                     camera_names=[PRIMARY_CAMERA] + ([WRIST_CAMERA] if wrist else []), camera_heights=resolution, camera_widths=resolution,
                     control_freq=20, hard_reset=False, ignore_done=True, reward_shaping=False)
    np.random.seed(seed)  # robosuite 1.4 draws placements from numpy's global generator
    return env


class LiftBenchmark(StepBenchmark):
    """robosuite Lift through vla-eval. One task; episode i resets with seed `seed + i`.

    send_wrist_image / send_state: LIBERO's parameters (vla-eval's LiberoBenchmark): add `images["wrist"]` (the
    eye-in-hand camera, rendered only then) and `states` (lift_state) to each observation. The demonstrations
    of `make eval-demo` record the same two (apps/eval_demo.py), so a checkpoint trained with CAMERAS=primary,wrist
    PROPRIO=1 gets at evaluation what it was trained on.
    trace_dir: when set, each step's rendered frame (before the transform; `wrist_frame` too when rendered), the
    state when sent, the action received from the server and the action applied are saved as
    `ep{i}_step{t}.npz`: how the tests (and a user chasing a convention bug) compare what the env rendered and
    received with the model side.
    """

    render_backends = frozenset({"gpu", "cpu"})

    @classmethod
    def configure_render(cls, mode: str) -> dict[str, str]:
        os.environ.update(RENDER_ENV)  # EGL in both modes: Mesa's software EGL on CPU hosts (see module doc)
        return dict(RENDER_ENV)

    def __init__(self, seed: int = 0, max_steps: int = 60, num_steps_wait: int = 0, send_wrist_image: bool = False,
                 send_state: bool = False, send_object_state: bool = False, trace_dir: str | None = None,
                 check_renderer: bool = True) -> None:
        super().__init__()
        self.seed, self.max_steps, self.num_steps_wait = seed, max_steps, num_steps_wait
        self.send_wrist_image, self.send_state = bool(send_wrist_image), bool(send_state)
        self.send_object_state = send_object_state
        self.trace_dir = Path(trace_dir) if trace_dir else None
        self._check_renderer = check_renderer
        self._env = None
        self._episode = -1
        self._t = 0
        self.received: list[np.ndarray] = []

    def get_tasks(self) -> list[Task]:
        return [{"name": INSTRUCTION, "task_id": 0}]

    def _ensure_env(self):
        if self._env is None:
            if self._check_renderer:
                check_render()
            self._env = make_lift_env(self.seed, wrist=self.send_wrist_image)
        return self._env

    def reset(self, task: Task) -> Any:
        env = self._ensure_env()
        self._episode = int(task.get("episode_idx", self._episode + 1))
        np.random.seed(self.seed + self._episode)
        obs = env.reset()
        for _ in range(self.num_steps_wait):  # LIBERO's settle steps: no motion, gripper open
            obs, _, _, _ = env.step([0.0] * 6 + [-1.0])
        self._t = 0
        self.received = []
        self._recorder.record_video(env_image(obs["agentview_image"]))
        self._trace(obs, None, None)
        return obs

    def step(self, action: Action) -> StepResult:
        raw = action.get("actions", action.get("action")) if isinstance(action, dict) else action
        arr = np.asarray(raw, dtype=np.float64).reshape(-1)
        if arr.shape != (ACTION_DIM,) or not np.isfinite(arr).all():
            raise ValueError(f"Lift expects a finite {ACTION_DIM}-d action [dpos 3, daxis-angle 3, gripper], "
                             f"got shape {np.asarray(raw).shape}: {raw!r}")
        applied = discretise_gripper(arr)
        self.received.append(arr)
        obs, reward, _, info = self._env.step(applied)
        self._t += 1
        success = bool(self._env._check_success())
        self._recorder.record_video(env_image(obs["agentview_image"]))
        self._recorder.record_step(reward=float(reward), success=success, action=applied.astype(np.float32))
        self._trace(obs, arr, applied)
        return StepResult(obs=obs, reward=float(reward), done=success, info={**info, "success": success})

    def _trace(self, obs, received, applied) -> None:
        if self.trace_dir is None:
            return
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        extra = {} if received is None else {"received": received, "applied": applied}
        if self.send_wrist_image:
            extra["wrist_frame"] = obs[f"{WRIST_CAMERA}_image"]
        if self.send_state:
            extra["state"] = lift_state(obs)
        np.savez(self.trace_dir / f"ep{self._episode}_step{self._t}.npz", frame=obs["agentview_image"],
                 eef_pos=obs["robot0_eef_pos"], cube_pos=obs["cube_pos"], **extra)

    def make_obs(self, raw_obs: Any, task: Task) -> Observation:
        out: dict[str, Any] = {"images": {"agentview": env_image(raw_obs["agentview_image"])},
                               "task_description": task["name"]}
        if self.send_wrist_image:  # vla-eval's LIBERO key and transform (env_image)
            out["images"]["wrist"] = env_image(raw_obs[f"{WRIST_CAMERA}_image"])
        if self.send_state:
            out["states"] = lift_state(raw_obs)
        if self.send_object_state:
            out["object_pos"] = np.asarray(raw_obs["cube_pos"], dtype=np.float32)
            out["eef_pos"] = np.asarray(raw_obs["robot0_eef_pos"], dtype=np.float32)
        return out

    def get_step_result(self, step_result: StepResult) -> EpisodeResult:
        return {"success": bool(step_result.done)}

    def get_metadata(self) -> dict[str, Any]:
        return {"max_steps": self.max_steps, "task": "robosuite Lift (Panda, OSC_POSE)", "seed": self.seed}

    def get_action_spec(self) -> dict[str, DimSpec]:
        return {"position": POSITION_DELTA, "rotation": ROTATION_AA, "gripper": GRIPPER_CLOSE_POS}

    def get_observation_spec(self) -> dict[str, DimSpec]:
        spec = {"agentview": IMAGE_RGB, "language": LANGUAGE}
        if self.send_wrist_image:
            spec["wrist"] = IMAGE_RGB
        if self.send_state:
            spec["state"] = STATE_EEF_POS_AA_GRIP
        return spec

    def cleanup(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


# ---- a scripted grasp-and-lift controller (proof that success detection and the action convention hold) ----
def scripted_lift_action(eef_pos, cube_pos, state: dict) -> np.ndarray:
    """One 7-d OSC_POSE action from eef and cube positions. `state` carries the phase between calls.

    Phases: above the cube (gripper open) -> down to it -> close for 6 steps -> up. Position gain
    20/m: a 5 cm error is a full-scale (+-1 -> 5 cm) command. Rotation 0: Lift's cube is axis-aligned.
    """
    eef, cube = np.asarray(eef_pos, dtype=np.float64), np.asarray(cube_pos, dtype=np.float64)
    phase = state.setdefault("phase", 0)
    if phase == 0:
        target, grip = cube + [0, 0, 0.05], -1.0
    elif phase == 1:
        target, grip = cube + [0, 0, -0.005], -1.0
    elif phase == 2:
        target, grip = eef, 1.0
    else:
        target, grip = np.array([eef[0], eef[1], cube[2] + 0.2]), 1.0
    err = target - eef
    if phase == 0 and np.linalg.norm(err[:2]) < 0.01 and abs(err[2]) < 0.02:
        state["phase"] = 1
    elif phase == 1 and np.linalg.norm(err) < 0.01:
        state["phase"], state["closing"] = 2, 0
    elif phase == 2:
        state["closing"] += 1
        if state["closing"] >= 6:
            state["phase"] = 3
    action = np.zeros(ACTION_DIM)
    action[:3] = np.clip(err * 20.0, -1.0, 1.0)
    action[6] = grip
    return action


class ScriptedLiftServer(PredictModelServer):
    """The scripted controller as a vla-eval model server: it asks the benchmark for the cube and
    eef positions (send_object_state, through vla-eval's observation_params) and answers through the
    same 7-d action interface a model uses, gripper already in robosuite's convention."""

    def __init__(self) -> None:
        super().__init__()
        self._state: dict = {}

    def get_observation_params(self) -> dict[str, Any]:
        return {"send_object_state": True}

    def get_action_spec(self) -> dict[str, DimSpec]:
        return {"position": POSITION_DELTA, "rotation": ROTATION_AA, "gripper": GRIPPER_CLOSE_POS}

    def get_observation_spec(self) -> dict[str, DimSpec]:
        return {"agentview": IMAGE_RGB, "language": LANGUAGE}

    def predict(self, obs, ctx) -> dict[str, np.ndarray]:
        if ctx.is_first:
            self._state = {}
        if "object_pos" not in obs or "eef_pos" not in obs:
            raise ValueError("the scripted controller needs object_pos and eef_pos (LiftBenchmark send_object_state)")
        return {"actions": scripted_lift_action(obs["eef_pos"], obs["object_pos"], self._state).astype(np.float32)}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Lift helpers: check offscreen rendering (MUJOCO_GL=egl), or serve the "
                                "scripted grasp-and-lift controller to vla-eval.")
    p.add_argument("--check-render", action="store_true", help="render one frame in a child process; exit 1 if not")
    p.add_argument("--serve-scripted", action="store_true", help="serve ScriptedLiftServer (vla-eval protocol)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    if args.serve_scripted:
        from vla_eval.model_servers.serve import serve

        serve(ScriptedLiftServer(), host=args.host, port=args.port)
        return 0
    if args.check_render:
        try:
            check_render()
        except RenderUnavailableError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(json.dumps({"render": "ok", **RENDER_ENV}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
