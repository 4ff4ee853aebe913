"""One-shot GPU check: the real llava-onevision-qwen2-0.5b-ov architecture, random weights, bf16.

    bash bench/gpu_check.sh                 # on the borrowed H200 (installs the carried wheels first)
    python bench/gpu_check.py --tiny        # CPU rehearsal with the tiny model (what the tests run)

For `pad` and `anyres_max_9` (480x640 Bridge frames), with the plugin's sparse LM head and with
upstream's full head, in the same run: training step time (forward + backward + AdamW, gradient
checkpointing on as scripts/finetune_ov_vla.sh has it), tokens/s (visual + text positions) and peak
GPU memory; then predict_action Hz for both modes. Writes a markdown table (--out) and prints it.
The full-head / sparse-head ratios are measured in the same run, so they compare like with like.
No DeepSpeed on that machine: a single GPU, plain torch AdamW (bf16 states), sdpa attention.
Budget: about 3-5 minutes on an H200 (model build on CPU included); --tiny about a minute on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU (rehearsal; numbers mean nothing)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per step (default 8 on GPU, 1 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration after 1 warm-up (default 5; 1 with --tiny)")
    p.add_argument("--predict-calls", type=int, default=None, help="timed predict_action calls per mode (default 20; 2 with --tiny)")
    p.add_argument("--modes", default="pad,anyres_max_9")
    p.add_argument("--out", default=None, help="markdown file to write (default bench_out/gpu_check.md)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    os.environ.update({"HF_HOME": str(work / "hf_home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_TF": "0"})
    import numpy as np
    import torch
    import transformers
    from PIL import Image

    from llava_vla_plugin.core.env import apply_env_defaults

    apply_env_defaults()
    from llava.mm_utils import process_images
    from llava.model.language_model.llava_qwen import LlavaQwenForCausalLM

    from llava_vla_plugin.train import sparse_head
    from llava_vla_plugin.infer.policy import VLAPolicy
    from llava_vla_plugin.core.prompt import VLAPromptBuilder
    from llava_vla_plugin.testing import onevision_configs as ov
    from llava_vla_plugin.apps.tiny_model import TOWER_ID, publish_tiny_siglip

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    bs = args.batch_size or (1 if args.tiny else 8)
    steps = args.steps or (1 if args.tiny else 5)
    calls = args.predict_calls or (2 if args.tiny else 20)
    dtype = torch.bfloat16 if (cuda or not args.tiny) else torch.float32
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    sparse_head.install(LlavaQwenForCausalLM)  # the training forward VLATrainer runs (no trainer import needed)
    full_forward = LlavaQwenForCausalLM.forward.__wrapped_upstream__

    t0 = time.time()
    if args.tiny:
        publish_tiny_siglip(work / "hf_home", TOWER_ID, layers=1)  # patch embedding only: cheapest tower
        bundle = ov.build_onevision("tiny", "pad", dtype=dtype, vision_tower=TOWER_ID)
    else:
        ov.publish_random_siglip(work / "hf_home", dtype=dtype)
        bundle = ov.build_onevision("0.5b", "pad", dtype=dtype)
    model = bundle.model.to(device)
    build_s = time.time() - t0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built {'tiny' if args.tiny else '0.5b'} llava_qwen ({n_params / 1e6:.1f}M parameters, {dtype}) on {device} "
          f"in {build_s:.0f} s", flush=True)

    rng = np.random.default_rng(0)
    frame = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    builder = VLAPromptBuilder(bundle.tokenizer, bundle.action_tokenizer)
    ids, labels = builder.build("put the cup in the sink", rng.uniform(-1, 1, 7))
    input_ids = torch.from_numpy(np.stack([ids] * bs)).to(device)
    labels_t = torch.from_numpy(np.stack([labels] * bs)).to(device)
    mask = torch.ones_like(input_ids)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    rows = []
    model.requires_grad_(True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    for mode in args.modes.split(","):
        model.config.image_aspect_ratio = mode
        px = process_images([frame], bundle.image_processor, model.config)[0].to(device, dtype)
        with torch.no_grad():
            emb = model.prepare_inputs_labels_for_multimodal(input_ids[:1], None, mask[:1], None, None, [px], ["image"], [frame.size])[4]
        positions = emb.shape[1]
        for head in ("sparse", "full"):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
            model.train()
            times = []
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            for i in range(steps + 1):
                sync()
                t = time.perf_counter()
                kwargs = dict(input_ids=input_ids, attention_mask=mask, labels=labels_t, images=[px] * bs,
                              image_sizes=[frame.size] * bs, modalities=["image"] * bs)
                out = model(**kwargs) if head == "sparse" else full_forward(model, **kwargs)
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync()
                if i:  # the first step is warm-up
                    times.append(time.perf_counter() - t)
            del opt, out
            step = statistics.median(times)
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            rows.append({"mode": mode, "head": head, "batch": bs, "positions": positions, "step_s": step,
                         "tokens_per_s": bs * positions / step, "peak_gib": peak})
            print(json.dumps(rows[-1]), flush=True)

    model.gradient_checkpointing_disable()
    model.config.use_cache = True
    model.eval()
    policy = VLAPolicy.from_upstream_model(model, bundle.tokenizer, bundle.image_processor, bundle.action_tokenizer, ov.example_statistics())
    hz = {}
    for mode in args.modes.split(","):
        model.config.image_aspect_ratio = mode
        policy.predict_action(frame, "put the cup in the sink", unnorm_key="bridge_orig")  # warm-up
        times = []
        for _ in range(calls):
            sync()
            t = time.perf_counter()
            policy.predict_action(frame, "put the cup in the sink", unnorm_key="bridge_orig")
            sync()
            times.append(time.perf_counter() - t)
        hz[mode] = 1.0 / statistics.median(times)
        print(json.dumps({"mode": mode, "predict_action_hz": hz[mode]}), flush=True)

    machine = (torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine())
    lines = [f"GPU check ({'tiny model, CPU rehearsal' if args.tiny else 'llava-onevision-qwen2-0.5b-ov architecture, random weights'}), "
             f"{machine}, torch {torch.__version__}, transformers {transformers.__version__}, Python "
             f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}; {dtype}, batch {bs}, 480x640 frames, gradient "
             f"checkpointing, AdamW, median of {steps} steps after 1 warm-up; model built in {build_s:.0f} s.", "",
             "| image mode | LM head | positions/sample | step (s) | tokens/s | peak GPU memory (GiB) | full/sparse step |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(x for x in rows if x["mode"] == r["mode"] and x["head"] == "sparse")
        lines.append(f"| {r['mode']} | {r['head']} | {r['positions']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['peak_gib']:.1f} | {r['step_s'] / base['step_s']:.2f}x |")
    lines += ["", "| image mode | predict_action (Hz, batch 1, 480x640) |", "|---|---|"]
    lines += [f"| {m} | {v:.2f} |" for m, v in hz.items()]
    table = "\n".join(lines) + "\n"
    out = Path(args.out) if args.out else ROOT / "bench_out" / "gpu_check.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    (out.with_suffix(".json")).write_text(json.dumps({"train": rows, "predict_hz": hz, "build_s": build_s}, indent=2))
    print(table)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
