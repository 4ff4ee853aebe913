"""The three action representations on the real llava-onevision-qwen2-0.5b-ov architecture (random
weights, bf16): actions/s and latency of VLAPolicy.predict_action for `bins`, `bins_chunk` and
`parallel_l1` (H = 8), with the same model and image, per image mode. On the borrowed GPU:

    bash bench/gpu_check.sh is the place for training numbers; this one is run the same way:
    PY=python3 CARRY=.gpu_carry bash -c '... bench/gpu_heads.py'   (see bench/gpu_check.sh for the install)
    python bench/gpu_heads.py --tiny        # CPU rehearsal with the tiny model (numbers mean nothing)

Why a second script: bench/bench_action_heads.py measures the tiny model, whose prefill is a real-width
SigLIP layer in front of a 64-wide LM, so its ratios say little about the 0.5B model (issue 23). Speed
does not depend on what the weights learned: the action rows and the head are untrained. Timing: wall
time with CUDA synchronisation, median of --calls after one warm-up call. No DeepSpeed is imported (the
GPU machine has none): the model is built directly, as in gpu_check.py.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU (rehearsal)")
    p.add_argument("--horizon", type=int, default=8)
    p.add_argument("--calls", type=int, default=None, help="timed calls per representation and mode (default 10; 2 with --tiny)")
    p.add_argument("--modes", default="pad,anyres_max_9")
    p.add_argument("--out", default=None, help="markdown file (default bench_out/gpu_heads.md)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gpu_heads_"))
    os.environ.update({"HF_HOME": str(work / "hf_home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_TF": "0"})
    import numpy as np
    import torch
    from PIL import Image

    from llava_vla_plugin.core.env import apply_env_defaults

    apply_env_defaults()
    from llava_vla_plugin.core.representations import ActionReprConfig, make_representation
    from llava_vla_plugin.infer.policy import VLAPolicy
    from llava_vla_plugin.testing import onevision_configs as ov
    from llava_vla_plugin.apps.tiny_model import TOWER_ID, publish_tiny_siglip

    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    calls = args.calls or (2 if args.tiny else 10)
    t0 = time.time()
    if args.tiny:
        publish_tiny_siglip(work / "hf_home", TOWER_ID, layers=2)
        bundle = ov.build_onevision("tiny", "pad", dtype=dtype, vision_tower=TOWER_ID)
    else:
        ov.publish_random_siglip(work / "hf_home", dtype=dtype)
        bundle = ov.build_onevision("0.5b", "pad", dtype=dtype)
    model = bundle.model.to(device).eval()
    build_s = time.time() - t0
    frame = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    stats = ov.example_statistics()
    reps = {}
    for name, h in (("bins", 1), ("bins_chunk", args.horizon), ("parallel_l1", args.horizon)):
        rep = make_representation(ActionReprConfig(name=name, horizon=h), bundle.action_tokenizer)
        rep.bind(bundle.tokenizer)
        reps[name] = rep
    torch.manual_seed(0)
    reps["parallel_l1"].prepare_model(model, bundle.tokenizer)  # a fresh head on the model (untrained)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    rows = []
    for mode in args.modes.split(","):
        model.config.image_aspect_ratio = mode
        for name, rep in reps.items():
            policy = VLAPolicy.from_upstream_model(model, bundle.tokenizer, bundle.image_processor, bundle.action_tokenizer, stats, action_repr=rep)
            action = policy.predict_action(frame, "put the cup in the sink", unnorm_key="bridge_orig")  # warm-up
            times = []
            for _ in range(calls):
                sync()
                t = time.perf_counter()
                policy.predict_action(frame, "put the cup in the sink", unnorm_key="bridge_orig")
                sync()
                times.append(time.perf_counter() - t)
            s = statistics.median(times)
            steps = rep.horizon
            rows.append({"mode": mode, "repr": name, "horizon": steps, "shape": list(np.asarray(action).shape),
                         "call_s": s, "actions_per_s": steps / s})
            print(json.dumps(rows[-1]), flush=True)
    lines = [f"Action representations on {'the tiny model (CPU rehearsal)' if args.tiny else 'the llava-onevision-qwen2-0.5b-ov architecture, random weights'}"
             f" ({torch.cuda.get_device_name(0) if cuda else 'CPU'}, torch {torch.__version__}, {dtype}, batch 1, 480x640 frame, "
             f"median of {calls} VLAPolicy.predict_action calls after a warm-up; {time.strftime('%Y-%m-%d')}; model built in {build_s:.0f} s)", "",
             "| image mode | representation | H | call (ms) | actions/s | vs bins | parallel_l1 vs this |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(x for x in rows if x["mode"] == r["mode"] and x["repr"] == "bins")
        pl = next(x for x in rows if x["mode"] == r["mode"] and x["repr"] == "parallel_l1")
        lines.append(f"| {r['mode']} | {r['repr']} | {r['horizon']} | {1000 * r['call_s']:.1f} | {r['actions_per_s']:.1f} | "
                     f"{r['actions_per_s'] / base['actions_per_s']:.2f}x | {pl['actions_per_s'] / r['actions_per_s']:.2f}x |")
    table = "\n".join(lines) + "\n"
    out = Path(args.out) if args.out else ROOT / "bench_out" / "gpu_heads.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "build_s": build_s}, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
