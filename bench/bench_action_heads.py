"""Actions/s and per-call latency of the three action representations (issue 14), in one run.

    .venv/bin/python bench/bench_action_heads.py [--horizon 8] [--iters 10] [--threads 1] [--vision-layers 2]

One tiny llava_qwen model (built here, offline, seconds), one image, batch 1; the same backbone and
weights decode as:
  bins          7 action tokens, constrained greedy generate()             -> 1 action per call
  bins_chunk    H x 7 action tokens, constrained greedy generate()         -> H actions per call
  parallel_l1   prompt + H x 7 placeholders, one forward, L1 head          -> H actions per call
Each call is VLAPolicy.predict_action (image preprocessing, prompt, decoding, un-normalization).
Speed does not depend on what the weights learned, so the heads and action rows are untrained.
Timing: alternating calls, median per representation; CPU process time with one torch thread by
default (wall time on a shared 2-core machine swings +-50%), wall time on CUDA.
Last line: `parallel_l1/bins actions/s: Nx`. Targets: parallel_l1 (H=8) >= 8x bins and >= 3x bins_chunk.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--horizon", type=int, default=8, help="chunk length H of bins_chunk and parallel_l1 (default 8)")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per representation (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 keeps torch's default)")
    parser.add_argument("--vision-layers", type=int, default=2,
                        help="tiny SigLIP layers as built (upstream drops the last: 2 = one layer runs, the suite's tiny "
                             "model; 1 = patch embedding only). The shared prefill, and so the chunk ratios, depend on it")
    parser.add_argument("--device", default=None)
    parser.add_argument("--work", help="folder for the tiny model (default: a temp dir)")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_heads_"))
    os.environ["HF_HOME"] = str(work / "tiny" / "hf_home")  # the tiny tower resolves from here
    os.environ.setdefault("USE_TF", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import numpy as np
    import torch
    from PIL import Image

    from llava_vla_plugin.core.representations import ActionReprConfig, make_representation
    from llava_vla_plugin.core.action_tokenizer import ActionTokenizer
    from llava_vla_plugin.infer.policy import VLAPolicy
    from llava_vla_plugin.train.register import register
    from llava_vla_plugin.apps.tiny_model import build_tiny_model

    if args.threads:
        torch.set_num_threads(args.threads)
    register()
    tiny = build_tiny_model(work / "tiny", vision_layers=args.vision_layers)
    from llava.model.builder import load_pretrained_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, model, image_processor, _ = load_pretrained_model(str(tiny.llava_dir), None, "llava_qwen", device_map=device,
                                                                 torch_dtype="float32", attn_implementation="sdpa")
    model.eval()
    model.config.image_aspect_ratio = "pad"
    at = ActionTokenizer()
    stats = {"bench": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False],
                                  "min": [-1.0] * 7, "max": [1.0] * 7}}}
    policies = {}
    for name, h in (("bins", 1), ("bins_chunk", args.horizon), ("parallel_l1", args.horizon)):
        rep = make_representation(ActionReprConfig(name=name, horizon=h), at)
        rep.bind(tokenizer)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        rep.prepare_model(model, tokenizer)
        policies[name] = VLAPolicy.from_upstream_model(model, tokenizer, image_processor, at, stats, action_repr=rep)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    instruction = "put the red cup in the sink"
    cuda = device.startswith("cuda")
    clock = time.perf_counter if cuda else time.process_time

    for p in policies.values():  # warm-up
        p.predict_action(image, instruction)
    times = {name: [] for name in policies}
    for _ in range(args.iters):
        for name, p in policies.items():
            if cuda:
                torch.cuda.synchronize()
            t0 = clock()
            out = p.predict_action(image, instruction)
            if cuda:
                torch.cuda.synchronize()
            times[name].append(clock() - t0)
            assert out.shape == ((7,) if p.horizon == 1 else (p.horizon, 7)), out.shape
    print(f"tiny llava_qwen ({args.vision_layers - 1} tower layer(s) run) on {device}, {args.threads or torch.get_num_threads()} thread(s), "
          f"{'wall' if cuda else 'CPU process'} time, median of {args.iters} calls, H={args.horizon}")
    rate = {}
    for name, p in policies.items():
        med = statistics.median(times[name])
        rate[name] = p.horizon / med
        print(f"  {name:12s} H={p.horizon:<2d} latency {med * 1000:8.1f} ms/call  {rate[name]:8.1f} actions/s")
    print(f"parallel_l1/bins_chunk actions/s: {rate['parallel_l1'] / rate['bins_chunk']:.1f}x")
    print(f"bins_chunk/bins actions/s: {rate['bins_chunk'] / rate['bins']:.1f}x")
    print(f"parallel_l1/bins actions/s: {rate['parallel_l1'] / rate['bins']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
