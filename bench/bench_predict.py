"""predict_action overhead against bare upstream model.generate with the same inputs (issue 6).

    .venv/bin/python bench/bench_predict.py                     # tiny model, built and trained here (~1 min)
    .venv/bin/python bench/bench_predict.py --checkpoint CKPT   # any llava_vla_plugin checkpoint

Timed, alternating, median of --iters runs each (one image, batch 1):
  bare      upstream `model.generate(input_ids, images=[...], image_sizes, modalities)` with inputs
            prepared beforehand, greedy, action_dim + 1 new tokens, no constraint (upstream's forward:
            LM head over every prompt position)
  predict   VLAPolicy.predict_action from the PIL image and the instruction: image preprocessing,
            prompt ids, constrained generation, decoding, un-normalization; same model, same forward
  predict+  the same with VLAPolicy's default last-position LM head (`keep_last_logits_only`)
Prints predict/bare (the overhead; target <= 1.10) and predict+/bare. --check exits 1 above 1.10.
On CPU the ratio uses process CPU time with one torch thread (--threads 1, default): wall time on a
shared 2-core machine swings by +-50% between runs of the same call; wall medians are printed too.
On CUDA it uses wall time with synchronization.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_checkpoint(work: Path) -> Path:
    """Tiny model + a few samples + 2 training steps through scripts/finetune_ov_vla.sh."""
    from llava_vla_plugin.apps.tiny_model import build_tiny_model
    from llava_vla_plugin.testing.vla_samples import colour_image, write_vla_dataset

    ckpt = work / "run-qwen"
    if (ckpt / "vla_action_tokenizer.json").exists():
        return ckpt
    tiny = build_tiny_model(work / "tiny")
    data = work / "data"
    write_vla_dataset(data, "ds_a", 4, image_fn=lambda i, r: colour_image(r, i % 3), action_fn=lambda i, r: r.uniform(-1, 1, 7))
    env = {**os.environ, **tiny.env(), "MODEL": str(tiny.llava_dir), "VISION_TOWER": tiny.vision_tower,
           "DATA": str(data / "ds_a/train.jsonl"), "IMAGE_FOLDER": str(data), "OUTPUT_DIR": str(ckpt), "NUM_GPUS": "0",
           "BATCH_SIZE": "2", "MAX_STEPS": "2", "SAVE_STEPS": "1000", "IMAGE_ASPECT_RATIO": "pad", "NUM_WORKERS": "0",
           "MODEL_MAX_LENGTH": "1024"}
    proc = subprocess.run(["bash", "scripts/finetune_ov_vla.sh", "--gradient_checkpointing", "False", "--save_strategy", "no"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"training the tiny checkpoint failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return ckpt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoint to time (default: build and train the tiny model in --work)")
    parser.add_argument("--work", help="folder for the tiny model and checkpoint (default: a temp dir)")
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--image-size", default="256x256", help="WxH of the test image (default 256x256)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 keeps torch's default)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default=None,
                        help="clock of the ratio (default: cpu = process time on CPU, wall on CUDA)")
    parser.add_argument("--json", help="write the numbers here too")
    parser.add_argument("--check", action="store_true", help="exit 1 when predict/bare > 1.10")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_predict_"))
    if not args.work:
        import atexit
        import shutil

        atexit.register(shutil.rmtree, work, ignore_errors=True)
    if not args.checkpoint:
        # The tiny tower resolves from this cache; it must be set before transformers is imported.
        os.environ["HF_HOME"] = str(work / "tiny" / "hf_home")
    os.environ.setdefault("USE_TF", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ckpt = Path(args.checkpoint) if args.checkpoint else build_checkpoint(work)

    import numpy as np
    import torch
    from PIL import Image
    from transformers import GenerationConfig

    from llava_vla_plugin.infer.policy import VLAPolicy, keep_last_logits_only

    policy = VLAPolicy.from_pretrained(ckpt, device=args.device, dtype=args.dtype, last_logits_only=False)
    model = policy.model
    w, h = (int(x) for x in args.image_size.lower().split("x"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    instruction = "put the red cup in the sink"
    key = policy.dataset_names[0]
    inputs = policy.prepare([image], [instruction])
    bare_config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=policy.action_dim + 1,
                                   pad_token_id=policy.pad_id, eos_token_id=None)
    sync = torch.cuda.synchronize if policy.device.type == "cuda" else (lambda: None)

    def bare():
        with torch.inference_mode():
            out = model.generate(**inputs.generate_kwargs(), generation_config=bare_config, use_model_defaults=False)
        assert out.shape[-1] == policy.action_dim + 1

    def predict():
        policy.predict_action(image, instruction, unnorm_key=key)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    clock = args.clock or ("wall" if policy.device.type == "cuda" else "cpu")

    def timed(fn) -> tuple[float, float]:
        sync()
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        return time.perf_counter() - w0, time.process_time() - c0

    def measure(fns: dict) -> dict:
        for fn in fns.values():  # warm-up
            fn(), fn()
        times = {name: [] for name in fns}
        for _ in range(args.iters):  # alternate, so drifting machine load hits both alike
            for name, fn in fns.items():
                times[name].append(timed(fn))
        return {name: {"wall": statistics.median(w for w, _ in t), "cpu": statistics.median(c for _, c in t)}
                for name, t in times.items()}

    first = measure({"bare": bare, "predict": predict})
    keep_last_logits_only(model)
    second = measure({"predict_last_logits": predict})
    prep = measure({"prepare": lambda: policy.prepare([image], [instruction])})["prepare"]
    res = {
        "checkpoint": str(ckpt), "device": str(policy.device), "dtype": str(policy.dtype),
        "threads": torch.get_num_threads(), "clock": clock, "image": args.image_size, "iters": args.iters,
        "prompt_ids": int(inputs.input_ids.shape[1]),
        "bare_generate": first["bare"], "predict_action": first["predict"],
        "predict_action_last_logits": second["predict_last_logits"], "prepare_inputs": prep,
        "ratio_predict_vs_bare": first["predict"][clock] / first["bare"][clock],
        "ratio_predict_last_logits_vs_bare": second["predict_last_logits"][clock] / first["bare"][clock],
    }
    ms = lambda d: f"{d[clock] * 1e3:8.1f} ms {clock}  ({d['wall' if clock == 'cpu' else 'cpu'] * 1e3:7.1f} ms {'wall' if clock == 'cpu' else 'cpu'})"
    print(f"checkpoint {ckpt}  device {res['device']} {res['dtype']}  threads {res['threads']}  image {args.image_size}  "
          f"medians of {args.iters}")
    print(f"bare upstream generate                     {ms(res['bare_generate'])}")
    print(f"predict_action, same forward               {ms(res['predict_action'])}")
    print(f"  of which input preparation               {ms(prep)}")
    print(f"predict_action, default last-position head {ms(res['predict_action_last_logits'])}")
    print(f"ratio predict/bare: {res['ratio_predict_vs_bare']:.3f}  (target <= 1.10)")
    print(f"ratio predict(default)/bare: {res['ratio_predict_last_logits_vs_bare']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 1 if args.check and res["ratio_predict_vs_bare"] > 1.10 else 0


if __name__ == "__main__":
    sys.exit(main())
