"""One training step (forward + backward) of the tiny llava_qwen on a batch of VLA samples:
upstream's forward (LM head over every position) vs the plugin's (LM head on labelled positions).

    .venv/bin/python bench/bench_train_step.py [--batch 8] [--iters 5]

Each mode runs in its own process so peak memory (max RSS) is its own. Same model, same batch;
the loss is checked to agree.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(mode: str, tiny_dir: str, data: str, batch: int, iters: int) -> dict:
    import copy
    from types import SimpleNamespace

    import torch
    from transformers import AutoTokenizer

    from llava_vla_plugin.train import register
    torch.manual_seed(0)
    register.register()
    from llava.model.language_model.llava_qwen import LlavaQwenForCausalLM
    from llava.train.train import DataCollatorForSupervisedDataset

    from llava_vla_plugin.train.dataset import VLADataset
    from llava_vla_plugin.train.register import add_action_tokens

    model = LlavaQwenForCausalLM.from_pretrained(f"{tiny_dir}/tiny-llava-qwen", attn_implementation="sdpa", torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(f"{tiny_dir}/tiny-llava-qwen", model_max_length=1024)
    add_action_tokens(model, tok)
    vt = model.get_vision_tower()
    args = SimpleNamespace(image_folder=str(Path(data).parent.parent), image_processor=vt.image_processor, image_aspect_ratio="pad",
                           is_multimodal=True, early_mix_text=False, image_grid_pinpoints=None, mm_use_im_start_end=False)
    ds = VLADataset(data, tok, args)
    inputs = DataCollatorForSupervisedDataset(tok)([ds[i] for i in range(batch)])
    inputs.pop("ids", None)
    model.train()
    forward = type(model).forward
    if mode == "upstream":
        forward = forward.__wrapped_upstream__
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, loss = [], None
    for _ in range(iters):
        t = time.perf_counter()
        out = forward(model, **copy.copy(inputs))
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        loss = float(out.loss)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "step_s": statistics.median(times), "loss": loss, "peak_rss_mb": peak / 1024,
            "rss_growth_mb": (peak - base_rss) / 1024, "logits_shape": list(out.logits.shape)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--_mode"), ap.add_argument("--_tiny"), ap.add_argument("--_data")
    args = ap.parse_args()
    if args._mode:
        print("RESULT" + json.dumps(measure(args._mode, args._tiny, args._data, args.batch, args.iters)))
        return 0

    from llava_vla_plugin.apps.tiny_model import build_tiny_model
    from llava_vla_plugin.testing.vla_samples import colour_image, write_vla_dataset

    with tempfile.TemporaryDirectory() as d:
        tiny = build_tiny_model(Path(d) / "tiny", vision_layers=1)
        data = write_vla_dataset(Path(d) / "data", "ds", args.batch, image_fn=lambda i, r: colour_image(r, i % 3, (256, 320)),
                                 action_fn=lambda i, r: r.uniform(-1, 1, 7))
        env = {**os.environ, **tiny.env(), "PYTHONPATH": str(ROOT)}
        results = {}
        for mode in ["upstream", "sparse"]:
            proc = subprocess.run([sys.executable, __file__, "--_mode", mode, "--_tiny", str(tiny.root), "--_data", str(data),
                                   "--batch", str(args.batch), "--iters", str(args.iters)], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            results[mode] = json.loads(proc.stdout.split("RESULT", 1)[1])
    up, sp = results["upstream"], results["sparse"]
    assert abs(up["loss"] - sp["loss"]) < 1e-4 * max(1.0, abs(up["loss"])), (up["loss"], sp["loss"])
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, date {time.strftime('%Y-%m-%d')}; tiny llava_qwen, pad, batch {args.batch}")
    for r in (up, sp):
        print(f"  {r['mode']:8s}: step {r['step_s']:6.2f} s   peak RSS {r['peak_rss_mb']:7.0f} MB (+{r['rss_growth_mb']:5.0f} MB in the loop)"
              f"   logits {r['logits_shape']}   loss {r['loss']:.5f}")
    print(f"  speed-up {up['step_s'] / sp['step_s']:.1f}x, loop memory {up['rss_growth_mb'] / max(sp['rss_growth_mb'], 1):.1f}x less; same loss")
    return 0


if __name__ == "__main__":
    sys.exit(main())
