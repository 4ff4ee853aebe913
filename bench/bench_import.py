"""Frames/s of `vla-import lerobot` against the raw PyAV decode of the same videos, and --workers scaling, in one run.

    .venv/bin/python bench/bench_import.py [--episodes 24] [--frames 100] [--size 256] [--workers 1,2] [--data PATH]

Without --data it writes a LeRobot v2.1-layout dataset (parquet via pyarrow, one AV1 mp4 per episode via PyAV's
libsvtav1, LeRobot's default codec) into a temp folder: `episodes` x `frames` frames of `size` x `size`,
smooth moving patterns (codec-realistic, not noise). With --data it reads an existing LeRobotDataset folder.
Measured, each on the same files:
  decode     every frame of every episode's primary video, PyAV, to RGB arrays (the floor: the import must decode)
  +JPEG      the same, each frame also encoded as JPEG at the mapping's quality (the import must do this too)
  import wN  data_tools.byod import with N worker processes (decode + JPEG encode + files + statistics), fresh --out
Prints frames/s and the import / decode ratio; last line `import w1 / raw decode: Nx`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_dataset(root: Path, episodes: int, frames: int, size: int, fps: int = 10) -> None:
    """A LeRobot v2.1 layout (the layout data_tools/import_lerobot.py documents), written with pyarrow + PyAV."""
    import av
    import pyarrow as pa
    import pyarrow.parquet as pq

    key = "observation.images.front"
    (root / "meta").mkdir(parents=True)
    features = {key: {"dtype": "video", "shape": [size, size, 3], "names": ["height", "width", "channels"]},
                "observation.state": {"dtype": "float32", "shape": [8], "names": None},
                "action": {"dtype": "float32", "shape": [7], "names": None}}
    for k in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        features[k] = {"dtype": "float32" if k == "timestamp" else "int64", "shape": [1], "names": None}
    info = {"codebase_version": "v2.1", "fps": fps, "chunks_size": 1000, "robot_type": "bench",
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
            "features": features, "total_episodes": episodes, "total_frames": episodes * frames}
    (root / "meta/info.json").write_text(json.dumps(info, indent=2))
    (root / "meta/tasks.jsonl").write_text(json.dumps({"task_index": 0, "task": "pick up the block"}) + "\n")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    with open(root / "meta/episodes.jsonl", "w") as meta:
        for e in range(episodes):
            meta.write(json.dumps({"episode_index": e, "tasks": ["pick up the block"], "length": frames}) + "\n")
            (root / "data/chunk-000").mkdir(parents=True, exist_ok=True)
            n = np.arange(frames)
            table = pa.table({
                "observation.state": pa.array(rng.normal(size=(frames, 8)).astype(np.float32).tolist(), pa.list_(pa.float32(), 8)),
                "action": pa.array(rng.uniform(-1, 1, (frames, 7)).astype(np.float32).tolist(), pa.list_(pa.float32(), 7)),
                "timestamp": pa.array((n / fps).astype(np.float32)), "frame_index": pa.array(n),
                "episode_index": pa.array(np.full(frames, e)), "index": pa.array(n + e * frames),
                "task_index": pa.array(np.zeros(frames, np.int64))})
            pq.write_table(table, root / f"data/chunk-000/episode_{e:06d}.parquet")
            vdir = root / "videos/chunk-000" / key
            vdir.mkdir(parents=True, exist_ok=True)
            with av.open(str(vdir / f"episode_{e:06d}.mp4"), "w") as out:
                stream = out.add_stream("libsvtav1", rate=fps, options={"preset": "12"})
                stream.width = stream.height = size
                stream.pix_fmt = "yuv420p"
                for t in range(frames):
                    img = np.stack([(xx + 3 * t + 20 * e) % 256, (yy + 2 * t) % 256, ((xx + yy) // 2 + t) % 256], -1)
                    for packet in stream.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")):
                        out.mux(packet)
                for packet in stream.encode():
                    out.mux(packet)


def raw_decode(root: Path, source, encode=None) -> int:
    """Every frame of every episode's primary video to RGB (and through `encode`, when given)."""
    import av

    n = 0
    for ref in source.refs():
        for _, video, _, _ in ref.videos:
            with av.open(str(root / video)) as c:
                s = c.streams.video[0]
                s.thread_type = "AUTO"
                for frame in c.decode(s):
                    px = frame.to_ndarray(format="rgb24")
                    if encode is not None:
                        encode(px)
                    n += 1
    return n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=24)
    p.add_argument("--frames", type=int, default=100, help="frames per episode")
    p.add_argument("--size", type=int, default=256, help="frame height and width")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    p.add_argument("--data", type=Path, default=None, help="an existing LeRobotDataset folder instead of the synthetic one")
    args = p.parse_args()

    from data_tools.byod import ImportOptions, import_source
    from data_tools.import_lerobot import DEFAULTS, LeRobotSource

    tmp = Path(tempfile.mkdtemp(prefix="bench_import_"))
    try:
        root = args.data
        if root is None:
            root = tmp / "lerobot"
            t = time.perf_counter()
            write_dataset(root, args.episodes, args.frames, args.size)
            print(f"wrote {args.episodes} x {args.frames} frames of {args.size}x{args.size} (AV1) in "
                  f"{time.perf_counter() - t:.1f}s")
        source = LeRobotSource(root, DEFAULTS)
        t = time.perf_counter()
        n = raw_decode(root, source)
        decode_fps = n / (time.perf_counter() - t)
        print(f"raw PyAV decode      {n:6d} frames  {decode_fps:8.1f} frames/s")
        from data_tools.byod import pixels_to_jpeg

        t = time.perf_counter()
        raw_decode(root, source, lambda px: pixels_to_jpeg(px, source.mapping))
        enc_fps = n / (time.perf_counter() - t)
        print(f"decode + JPEG q{source.mapping.jpeg_quality}   {n:6d} frames  {enc_fps:8.1f} frames/s  "
              f"({enc_fps / decode_fps:.2f}x raw decode: the work an import cannot skip)")
        first = None
        for w in [int(x) for x in args.workers.split(",")]:
            out = tmp / f"out_w{w}"
            t = time.perf_counter()
            m = import_source(source, out, "bench", source.mapping, ImportOptions(workers=w, progress=False))
            frames = m["counts"]["num_transitions"]
            fps = frames / (time.perf_counter() - t)
            first = first or fps
            print(f"import --workers {w:<3d} {frames:6d} frames  {fps:8.1f} frames/s  ({fps / decode_fps:.2f}x raw decode, "
                  f"{fps / enc_fps:.2f}x decode+JPEG, {fps / first:.2f}x workers=1)")
            if w == 1:
                w1 = fps
        print(f"import w1 / raw decode: {w1 / decode_fps:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
