"""Per-sample preparation of VLA samples: ours vs upstream preprocess_qwen, same samples, real tokenizer.

    .venv/bin/python bench/bench_dataset.py [--samples 300]

Prints (1) tokenization + labels per sample, ours vs upstream's preprocess_qwen (target: >= 100x
faster), (2) whole VLADataset.__getitem__ with images for image_aspect_ratio pad and anyres_max_9
at Bridge's 480x640 and Fractal's 256x320 frame sizes.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def timed(fn, n: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=300)
    args = ap.parse_args()

    from llava.train.train import preprocess_qwen

    from llava_vla_plugin.core.action_tokenizer import ActionTokenizer
    from llava_vla_plugin.core.prompt import VLAPromptBuilder
    from llava_vla_plugin.apps.tiny_model import build_qwen2_tokenizer

    tok = build_qwen2_tokenizer()
    at = ActionTokenizer()
    at.add_to_tokenizer(tok)
    builder = VLAPromptBuilder(tok, at)
    rng = np.random.default_rng(0)
    n = args.samples
    instructions = [f"put the {w} in the {v}" for w, v in zip(rng.choice(["cup", "spoon", "block", "towel"], n), rng.choice(["sink", "pot", "drawer"], n))]
    actions = rng.uniform(-1, 1, (n, 7))
    sources = [[[{"from": "human", "value": f"<image>\nWhat action should the robot take to {instructions[i]}?"},
                 {"from": "gpt", "value": "".join(at.tokens[b] for b in at.encode(actions[i]))}]] for i in range(n)]

    n_up = min(n, 60)  # upstream is slow: fewer samples give the same per-sample time
    t_up = timed(lambda i: preprocess_qwen(sources[i], tok, has_image=True), n_up)
    # worst case: a fresh builder and a different instruction every sample, nothing cached
    cold = VLAPromptBuilder(tok, at)
    unique = [f"{s} number {i}" for i, s in enumerate(instructions)]
    t_ours_cold = timed(lambda i: cold.build(unique[i], actions[i]), n)
    t_ours = timed(lambda i: builder.build(instructions[i], actions[i]), n)
    for i in range(min(n, 20)):  # same ids as upstream, checked while we are here
        assert (preprocess_qwen(sources[i], tok, has_image=True)["input_ids"][0].numpy() == builder.build(instructions[i], actions[i])[0]).all()

    print(f"machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}, date {time.strftime('%Y-%m-%d')}")
    print("tokenization + labels per sample (real Qwen2 tokenizer):")
    print(f"  upstream preprocess_qwen : {t_up * 1e3:9.3f} ms")
    print(f"  ours, cold cache         : {t_ours_cold * 1e3:9.3f} ms   speed-up {t_up / t_ours_cold:8.0f}x")
    print(f"  ours, warm cache         : {t_ours * 1e3:9.3f} ms   speed-up {t_up / t_ours:8.0f}x   (target >= 100x)")

    # memory of the sample list: dicts (upstream's list_data_dict) vs our SampleStore
    import gc
    import json
    import tracemalloc

    from llava_vla_plugin.core.training_data import load_data, read_samples

    n_mem = 100_000
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "train.jsonl"
        with path.open("w") as f:
            for i in range(n_mem):
                a = actions[i % n].round(6).tolist()
                f.write(json.dumps({"id": f"bridge_orig/train/{i // 30:06d}/{i % 30:04d}", "image": f"bridge_orig/images/train/{i // 30:06d}/{i % 30:04d}.jpg",
                                    "conversations": [{"from": "human", "value": f"<image>\nWhat action should the robot take to {instructions[i % n]}?"},
                                                      {"from": "gpt", "value": a}],
                                    "dataset": "bridge_orig", "split": "train", "episode": i // 30, "step": i % 30, "action_raw": a}) + "\n")
        mem = {}
        for name, fn in [("list of dicts", lambda: read_samples(path)), ("SampleStore", lambda: load_data(str(path))[0])]:
            gc.collect()
            tracemalloc.start()
            obj = fn()
            mem[name] = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            del obj
        print(f"sample list in memory, {n_mem:,} converted frames (per training process, before DataLoader workers):")
        for name, b in mem.items():
            print(f"  {name:14s}: {b / 2**20:7.1f} MB  ({b / n_mem:6.0f} B/sample)")
        print(f"  SampleStore uses {mem['list of dicts'] / mem['SampleStore']:.1f}x less")

    # whole __getitem__ with images
    from llava.model.multimodal_encoder.siglip_encoder import SigLipImageProcessor

    from llava_vla_plugin.train import register
    from llava_vla_plugin.testing.vla_samples import write_vla_dataset

    register.register()
    from llava_vla_plugin.train.dataset import VLADataset

    with tempfile.TemporaryDirectory() as d:
        print("VLADataset.__getitem__ with images (decode + preprocess + ids/labels), ms per sample:")
        for (h, w) in [(256, 320), (480, 640)]:
            name = f"ds_{h}x{w}"
            write_vla_dataset(d, name, 40, image_fn=lambda i, r: r.integers(0, 256, (h, w, 3), dtype=np.uint8),
                              action_fn=lambda i, r: r.uniform(-1, 1, 7))
            for aspect in ["pad", "anyres_max_9"]:
                pinpoints = [[384 * a, 384 * b] for a in range(1, 7) for b in range(1, 7)]
                data_args = SimpleNamespace(image_folder=d, image_processor=SigLipImageProcessor(), image_aspect_ratio=aspect,
                                            is_multimodal=True, early_mix_text=False, image_grid_pinpoints=pinpoints,
                                            mm_use_im_start_end=False)
                ds = VLADataset(f"{d}/{name}/train.jsonl", copy.deepcopy(tok), data_args)
                ds[0]
                times = []
                for i in range(40):
                    t = time.perf_counter()
                    item = ds[i]
                    times.append(time.perf_counter() - t)
                shape = tuple(item["image"][0][0].shape)
                print(f"  {h}x{w} {aspect:13s}: {statistics.median(times) * 1e3:7.1f} ms  (pixel tensor {shape})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
