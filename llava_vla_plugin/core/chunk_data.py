"""Future-action windows for training samples, built at load time from the converted per-episode action
sequences (`<dataset>/<split>_actions.npz`, owner data_tools/converted_format.py; rules in
data_tools/action_windows.py). H is a training option: the same converted data trains any horizon.

Data converted before the sequences existed has no such file: it still trains with H = 1 (the sample's
own action), and H > 1 stops with an error that says so. The robot state (PROPRIO=1) is read the same way from
`<dataset>/<split>_proprio.npz` (ProprioSource).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from data_tools.action_windows import action_window, frame_has_window
from data_tools.converted_format import EpisodeActions, episode_actions_file, episode_proprio_file

log = logging.getLogger(__name__)


class MissingEpisodeActionsError(FileNotFoundError):
    pass


class WindowSource:
    """Windows [H, D] for samples (located by their `_source` file, `split`, `episode`, `step`)."""

    def __init__(self, horizon: int, mode: str):
        self.horizon, self.mode = horizon, mode
        self._files: dict[Path, EpisodeActions] = {}

    def _actions(self, sample: dict) -> EpisodeActions:
        source = sample.get("_source")
        if source is None:
            raise MissingEpisodeActionsError(f"sample {sample.get('id')!r} has no source file: cannot locate its episode actions")
        path = Path(source).parent / episode_actions_file(str(sample["split"]))
        ea = self._files.get(path)
        if ea is None:
            if not path.exists():
                raise MissingEpisodeActionsError(
                    f"{path} does not exist: {source} was converted without per-episode action sequences, which "
                    f"--vla_horizon {self.horizon} needs. Re-convert it with this version of data_tools.convert "
                    "(the per-episode sequences are written beside train.jsonl), or train with --vla_horizon 1")
            ea = self._files[path] = EpisodeActions.load(path)
        return ea

    def locate(self, sample: dict) -> tuple[np.ndarray, int, np.ndarray]:
        """(episode actions [T, D], the sample's position t in them, absolute mask)."""
        ea = self._actions(sample)
        try:
            actions, steps = ea.episode(int(sample["episode"]))
        except KeyError as e:
            raise ValueError(f"sample {sample.get('id')!r}: {e} in {episode_actions_file(sample['split'])}") from None
        pos = int(np.searchsorted(steps, int(sample["step"])))
        if pos >= len(steps) or steps[pos] != int(sample["step"]):
            raise ValueError(f"sample {sample.get('id')!r}: step {sample['step']} is not in its episode's action sequence")
        return actions, pos, ea.absolute_mask

    def window(self, sample: dict) -> np.ndarray:
        actions, t, mask = self.locate(sample)
        window = action_window(actions, t, self.horizon, self.mode, mask)
        own = np.asarray(sample["conversations"][1]["value"], dtype=np.float32)
        if own.shape == window[0].shape and not np.allclose(window[0], own, atol=1e-6):
            raise ValueError(f"sample {sample.get('id')!r}: its action differs from the episode sequence's step "
                             f"{sample['step']} ({own.tolist()} vs {window[0].tolist()}): the action file is stale")
        return window

    def keep_mask(self, store) -> np.ndarray:
        """Which samples of a SampleStore have a window under the rule (oft drops the last H-1 frames of each
        episode; non-action samples are always kept). Parses every sample once."""
        from data_tools.converted_format import is_action_sample

        keep = np.ones(len(store), dtype=bool)
        if self.mode == "openvla" or self.horizon == 1:
            return keep
        for i in range(len(store)):
            s = store[i]
            if not is_action_sample(s):
                continue
            actions, t, _ = self.locate(s)
            keep[i] = frame_has_window(t, len(actions), self.horizon, self.mode)
        return keep


class MissingProprioError(FileNotFoundError):
    pass


class ProprioSource:
    """The raw state [S] of each sample, from `<split>_proprio.npz` beside its data file (the EpisodeActions layout,
    written by data_tools.convert and the importers; converted_format.episode_proprio_file), located by the
    sample's `episode` and `step` as the action windows are."""

    def __init__(self):
        self._files: dict[Path, EpisodeActions] = {}

    def _file(self, sample: dict) -> tuple[Path, EpisodeActions]:
        source = sample.get("_source")
        if source is None:
            raise MissingProprioError(f"sample {sample.get('id')!r} has no source file: cannot locate its state")
        path = Path(source).parent / episode_proprio_file(str(sample["split"]))
        ea = self._files.get(path)
        if ea is None:
            if not path.exists():
                raise MissingProprioError(
                    f"{path} does not exist: {source} was converted without the robot state, which PROPRIO=1 "
                    "(--vla_proprio True) needs. Re-convert the dataset with this version of data_tools.convert (it keeps "
                    "OpenVLA's state_obs_keys), or train without PROPRIO=1")
            ea = self._files[path] = EpisodeActions.load(path)
        return path, ea

    def dim(self, sample: dict) -> int:
        return int(self._file(sample)[1].actions.shape[1])

    def state(self, sample: dict) -> np.ndarray:
        path, ea = self._file(sample)
        try:
            states, steps = ea.episode(int(sample["episode"]))
        except KeyError as e:
            raise ValueError(f"sample {sample.get('id')!r}: {e} in {path}") from None
        pos = int(np.searchsorted(steps, int(sample["step"])))
        if pos >= len(steps) or steps[pos] != int(sample["step"]):
            raise ValueError(f"sample {sample.get('id')!r}: step {sample['step']} is not in its episode's state in {path}")
        return states[pos]
