"""LeRobotDataset v2.1 and v3.0 (a local folder) -> the converted format, reading the format's own files.

    vla-import lerobot PATH --name NAME --out converted/ [--mapping mapping.yaml] [--workers N]

Read with pyarrow (parquet) and PyAV (video); LeRobot itself is not imported: its releases pin torch, datasets
and torchvision below this project's pins (lerobot 0.3.3: torch<2.8, datasets<=3.6; 0.4.4: torch<2.11,
datasets<5; we pin torch 2.13, datasets 5.0.1), and reading needs none of it.

The two layouts, as LeRobot's source defines them (file:line in the released wheels lerobot 0.3.3 = v2.1 and
lerobot 0.4.4 = v3.0; the same files under src/lerobot/datasets/ in huggingface/lerobot):

v2.1 (lerobot 0.3.3, lerobot/datasets/lerobot_dataset.py:76 CODEBASE_VERSION = "v2.1"):
    meta/info.json            fps, features, data_path, video_path, chunks_size (utils.py:48, 488-492)
    meta/episodes.jsonl       {"episode_index", "tasks": [str], "length"} per line (utils.py:49; written at
                              lerobot_dataset.py:267-269)
    meta/tasks.jsonl          {"task_index", "task"} (utils.py:52); meta/episodes_stats.jsonl (utils.py:51)
    data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet          (utils.py:55)
    videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4 (utils.py:54)
    episode_chunk = episode_index // chunks_size (lerobot_dataset.py:134-145)
v3.0 (lerobot 0.4.4, lerobot/datasets/lerobot_dataset.py:83 CODEBASE_VERSION = "v3.0"; utils.py:50-71):
    data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet        many episodes per file
    videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4   many episodes, concatenated
    meta/episodes/chunk-XXX/file-XXX.parquet   one row per episode: tasks, length, data/chunk_index,
        data/file_index, dataset_from_index/to_index, videos/<key>/chunk_index, file_index, from_timestamp,
        to_timestamp (lerobot_dataset.py:195-219 resolves the files from them; the v2.1->v3.0 converter
        v30/convert_dataset_v21_to_v30.py:342-343 writes the timestamps)
    meta/tasks.parquet        task strings as the index, `task_index` column (utils.py:62, 337-344)
Both: the parquet columns timestamp, frame_index, episode_index, index, task_index (0.3.3 utils.py:68-74) and
the features. A frame at row timestamp t of an episode is the video frame at from_timestamp + t (v2.1: one
file per episode, from_timestamp 0), matched within LeRobot's tolerance_s = 1e-4 s
(0.4.4 lerobot_dataset.py:574, 1048-1064 `_query_videos`).

Checks, each an ImportInputError naming the file, the episode and the key: mapped columns present; row count
= the episode's `length`; frame_index = 0..T-1; timestamps = frame_index / fps (within tolerance); the video's
frame rate = info.json's fps; a video frame at every row's timestamp (a video shorter than its parquet is an
error, frames are never shifted to fit). Decoded frames are re-encoded as JPEG at `jpeg_quality` (manifest:
`images.reencoded`). An episode with no task is skipped, counted and listed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.byod import EpisodeData, EpisodeSkipped, ImportInputError, _files_digest, finish_actions, pixels_to_jpeg
from data_tools.byod_mapping import ImportMapping
from data_tools.images import frame_jpeg

TOLERANCE_S = 1e-4  # LeRobot's default tolerance_s (lerobot 0.4.4 lerobot_dataset.py:574)
SUPPORTED = ("v2.1", "v3.0")
DEFAULTS = ImportMapping(views={}, state="observation.state", action_key="action", instruction="task")


@dataclass(frozen=True)
class EpisodeRef:
    """Where one episode lives (picklable; a worker loads it)."""

    position: int
    episode_index: int
    length: int
    tasks: tuple[str, ...]
    data_file: str
    videos: tuple[tuple[str, str, float, float], ...]  # (key, file, from_timestamp, to_timestamp)

    def __str__(self) -> str:
        return f"{self.data_file}: episode {self.episode_index}"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise ImportInputError(f"{path}:{n}: not JSON ({e})") from None
    return rows


@dataclass
class LeRobotSource:
    """A LeRobotDataset folder (v2.1 or v3.0) with a mapping; `refs()` plans, `load()` reads one episode."""

    root: Path
    mapping: ImportMapping
    kind: str = "lerobot"
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        info_path = self.root / "meta" / "info.json"
        if not info_path.is_file():
            raise ImportInputError(f"{self.root}: no meta/info.json: not a LeRobotDataset folder")
        self.info = json.loads(info_path.read_text())
        self.version = str(self.info.get("codebase_version", "?"))
        if self.version not in SUPPORTED:
            raise ImportInputError(f"{info_path}: codebase_version {self.version!r}; supported: {', '.join(SUPPORTED)} "
                                   "(convert older datasets with LeRobot's own conversion scripts first)")
        self.fps = float(self.info["fps"])
        features = self.info.get("features", {})
        images = [k for k, v in features.items() if v.get("dtype") in ("video", "image")]
        if not self.mapping.views:
            if not images:
                raise ImportInputError(f"{info_path}: no image or video feature to use as the primary view")
            self.mapping = _with_views(self.mapping, {"primary": images[0], **{f"view{i}": k for i, k in enumerate(images[1:], 1)}})
        for role, key in self.mapping.views.items():
            if key not in features:
                raise ImportInputError(f"{info_path}: mapping view {role}={key!r} is not a feature of the dataset "
                                       f"(image features: {', '.join(images) or 'none'})")
        if self.mapping.state and self.mapping.state not in features:
            self.mapping = _with_state(self.mapping, None)  # no proprio in this dataset: nothing to keep
        if self.mapping.action_key not in features:
            raise ImportInputError(f"{info_path}: no feature {self.mapping.action_key!r} (the action); features: "
                                   f"{', '.join(features)}. Name it with `action: {{key: ...}}` in the mapping")

    # -- planning ---------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        primary = self.mapping.primary
        is_video = self.info["features"][primary].get("dtype") == "video"
        return {"kind": "lerobot", "path": str(self.root), "codebase_version": self.version, "fps": self.fps,
                "robot_type": self.info.get("robot_type"), "primary_view": primary,
                "views_not_exported": sorted(v for r, v in self.mapping.views.items() if r != "primary"),
                "images": {"reencoded": True, "from": "video decoded with PyAV" if is_video else "parquet image bytes",
                           "jpeg_quality": self.mapping.jpeg_quality}}

    def digest(self) -> str:
        files = [p for p in self.root.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".parquet", ".mp4")]
        return _files_digest(files, self.root)

    def _tasks_v21(self) -> dict[int, str]:
        return {int(r["task_index"]): str(r["task"]) for r in _read_jsonl(self.root / "meta" / "tasks.jsonl")}

    def refs(self) -> list[EpisodeRef]:
        primary = self.mapping.primary
        video_keys = [primary] if self.info["features"][primary].get("dtype") == "video" else []
        refs = []
        if self.version == "v2.1":
            path = self.root / "meta" / "episodes.jsonl"
            if not path.is_file():
                raise ImportInputError(f"{self.root}: no meta/episodes.jsonl (LeRobot v2.1 layout)")
            chunks = int(self.info.get("chunks_size", 1000))
            for pos, ep in enumerate(sorted(_read_jsonl(path), key=lambda r: int(r["episode_index"]))):
                idx = int(ep["episode_index"])
                chunk = idx // chunks
                data = self.info["data_path"].format(episode_chunk=chunk, episode_index=idx)
                videos = tuple((k, self.info["video_path"].format(episode_chunk=chunk, video_key=k, episode_index=idx),
                                0.0, float("inf")) for k in video_keys)
                refs.append(EpisodeRef(pos, idx, int(ep.get("length", -1)), tuple(ep.get("tasks") or ()), data, videos))
        else:
            import pyarrow.parquet as pq

            files = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
            if not files:
                raise ImportInputError(f"{self.root}: no meta/episodes/chunk-*/file-*.parquet (LeRobot v3.0 layout)")
            rows = []
            for f in files:
                t = pq.read_table(f)
                need = ["episode_index", "length", "data/chunk_index", "data/file_index"]
                need += [f"videos/{k}/{c}" for k in video_keys for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")]
                missing = [c for c in need if c not in t.column_names]
                if missing:
                    raise ImportInputError(f"{f}: missing columns {missing} (LeRobot v3.0 episodes metadata)")
                cols = [c for c in t.column_names if not c.startswith("stats/")]
                rows.extend(t.select(cols).to_pylist())
            for pos, ep in enumerate(sorted(rows, key=lambda r: int(r["episode_index"]))):
                data = self.info["data_path"].format(chunk_index=ep["data/chunk_index"], file_index=ep["data/file_index"])
                videos = tuple((k, self.info["video_path"].format(video_key=k, chunk_index=ep[f"videos/{k}/chunk_index"],
                                                                  file_index=ep[f"videos/{k}/file_index"]),
                                float(ep[f"videos/{k}/from_timestamp"]), float(ep[f"videos/{k}/to_timestamp"]))
                               for k in video_keys)
                refs.append(EpisodeRef(pos, int(ep["episode_index"]), int(ep["length"]), tuple(ep.get("tasks") or ()),
                                       data, videos))
        return refs

    # -- one episode (in a worker) ----------------------------------------------------------------
    def _task_names(self) -> dict[int, str]:
        if self.version == "v2.1":
            return self._tasks_v21()
        import pyarrow.parquet as pq

        t = pq.read_table(self.root / "meta" / "tasks.parquet")
        names = [c for c in t.column_names if c != "task_index"]
        if "task_index" not in t.column_names or not names:
            raise ImportInputError(f"{self.root / 'meta/tasks.parquet'}: expected the task strings and a task_index column")
        d = t.to_pydict()
        return {int(i): str(s) for i, s in zip(d["task_index"], d[names[0]])}

    def load(self, ref: EpisodeRef) -> EpisodeData:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        m = self.mapping
        path = self.root / ref.data_file
        where = f"{path}: episode {ref.episode_index}"
        if not path.is_file():
            raise ImportInputError(f"{where}: the data file is missing")
        primary = m.primary
        in_parquet = self.info["features"][primary].get("dtype") == "image"
        columns = ["timestamp", "frame_index", "episode_index", "task_index", m.action_key]
        columns += [m.state] if m.state else []
        columns += [primary] if in_parquet else []
        schema = pq.read_schema(path)
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise ImportInputError(f"{where}: missing column(s) {missing}; the file has {schema.names}. "
                                   "Map other keys in the mapping YAML, or re-export the dataset")
        table = pq.read_table(path, columns=columns)
        table = table.filter(pc.equal(table["episode_index"], ref.episode_index))
        cols = {c: table[c].to_pylist() for c in columns if c not in (m.action_key, m.state, primary)}
        n = table.num_rows
        if n == 0:
            raise ImportInputError(f"{where}: no rows for this episode in the data file")
        order = np.argsort(np.asarray(cols["frame_index"]), kind="stable")
        frame_index = np.asarray(cols["frame_index"], np.int64)[order]
        if ref.length >= 0 and n != ref.length:
            raise ImportInputError(f"{where}: {n} parquet rows, the episodes metadata says length {ref.length}")
        if not np.array_equal(frame_index, np.arange(n)):
            raise ImportInputError(f"{where}: frame_index is not 0..{n - 1} (gaps or duplicates)")
        ts = np.asarray(cols["timestamp"], np.float64)[order]
        off = np.abs(ts - frame_index / self.fps)
        if (off > TOLERANCE_S).any():
            r = int(np.argmax(off > TOLERANCE_S))
            raise ImportInputError(f"{where}: key 'timestamp': row {r} (frame_index {r}) has timestamp {ts[r]:.6f} s, "
                                   f"expected {r / self.fps:.6f} s at {self.fps:g} fps (meta/info.json); the rows do not "
                                   f"follow the frame rate. Fix the data or info.json's fps; frames are never shifted")
        actions = finish_actions(_column(table, m.action_key, where)[order], m, f"{where}: key {m.action_key!r}")
        state = _column(table, m.state, where)[order].reshape(n, -1).astype(np.float32) if m.state else None
        instruction = m.instruction_text or self._instruction(ref, np.asarray(cols["task_index"])[order], where)
        if in_parquet:
            stored = table[primary].to_pylist()
            frames, hows = [], set()
            for r in order.tolist():
                item = stored[r]
                data = item.get("bytes") if isinstance(item, dict) else item
                if not data:
                    raise ImportInputError(f"{where}: key {primary!r}: row {r} has no image bytes")
                if m.orientation == "none":  # a stored JPEG is kept as it is (bit-exact, as convert does)
                    jpeg, how = frame_jpeg(data, False)
                else:
                    jpeg, how = pixels_to_jpeg(_decode(data), m), "encoded"
                frames.append(jpeg)
                hows.add(how)
            how = "copied" if hows == {"copied"} else "encoded"
        else:
            key, video, start, _ = next(v for v in ref.videos if v[0] == primary)
            frames = decode_video_frames(self.root / video, start + ts, self.fps, where, key,
                                         lambda px: pixels_to_jpeg(px, m))
            how = "reencoded_video"
        return EpisodeData(ref.position, frames, actions, instruction, where, steps=frame_index, state=state,
                           image_how=how)

    def _instruction(self, ref: EpisodeRef, task_index: np.ndarray, where: str) -> str:
        names = self._task_names()
        tasks = [names.get(int(i), "") for i in np.unique(task_index)] if len(task_index) else []
        tasks = [t for t in tasks if t.strip()] or [t for t in ref.tasks if str(t).strip()]
        if not tasks:
            raise EpisodeSkipped("no_task", where, "no task string (task_index not in the tasks table, or empty)")
        # one instruction per episode is the format; LeRobot allows several tasks per episode: the first is used
        return tasks[0]


def _with_views(m: ImportMapping, views: dict[str, str]) -> ImportMapping:
    from dataclasses import replace

    return replace(m, views=views)


def _with_state(m: ImportMapping, state: str | None) -> ImportMapping:
    from dataclasses import replace

    return replace(m, state=state)


def _column(table, key: str, where: str) -> np.ndarray:
    """A fixed-size-list (or scalar) column as a [rows, dims] float array."""
    col = table[key].combine_chunks()
    try:
        values = np.asarray(col.to_pylist(), dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ImportInputError(f"{where}: key {key!r}: not a numeric column ({e})") from None
    return values.reshape(len(values), -1) if values.ndim != 2 else values


def _decode(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def decode_video_frames(video: Path, targets: np.ndarray, fps: float, where: str, key: str, encode) -> list[bytes]:
    """The frames of `video` at the times `targets` (seconds in the file), each passed through `encode`.

    Decodes sequentially from a seek to the first target (a keyframe at or before it) and takes the frame whose
    presentation time matches each target within TOLERANCE_S. A target with no matching frame is an error, as
    is a file that ends first (a video shorter than its parquet). Frame rate: the stream's average rate must
    be info.json's fps."""
    import av

    if not video.is_file():
        raise ImportInputError(f"{where}: key {key!r}: video file {video} is missing")
    out: list[bytes] = []
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate) if stream.average_rate else None
        if rate is not None and abs(rate - fps) > 1e-3:
            raise ImportInputError(f"{where}: key {key!r}: {video} runs at {rate:g} fps, meta/info.json says {fps:g}")
        if targets[0] > 0:
            container.seek(int(targets[0] / stream.time_base), stream=stream, backward=True, any_frame=False)
        j, last = 0, None
        for frame in container.decode(stream):
            t = float(frame.time)
            last = t
            if j < len(targets) and targets[j] < t - TOLERANCE_S:
                raise ImportInputError(f"{where}: key {key!r}: {video} has no frame at {targets[j]:.4f} s (row {j}); "
                                       f"the nearest is at {t:.4f} s. The video and the parquet timestamps disagree")
            if j < len(targets) and abs(t - targets[j]) <= TOLERANCE_S:
                out.append(encode(frame.to_ndarray(format="rgb24")))
                j += 1
                if j == len(targets):
                    break
    if j < len(targets):
        raise ImportInputError(f"{where}: key {key!r}: {video} is shorter than its parquet: {len(targets)} rows, "
                               f"video frames for {j} (last frame at {last if last is None else round(last, 4)} s, "
                               f"row {j} wants {targets[j]:.4f} s). Re-export the video; frames are never padded or shifted")
    return out
