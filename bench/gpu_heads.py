"""The four action representations on the real llava-onevision-qwen2-0.5b-ov architecture (random weights):
speed of VLAPolicy.predict_action for `bins` (H = 1), `bins_chunk`, `parallel_l1` and `fast` (H = 8), with the
same model, per image mode and image size, and the restricted LM head (issue 23 items 2 and 3) against the full one.

    bash bench/gpu_check.sh                      # the borrowed GPU (bf16): gpu_check.py, then this script
    python bench/gpu_heads.py                    # this script alone where the stack is installed
    python bench/gpu_heads.py --device cpu       # the same 0.5B architecture on the CPU (bf16, 2 timed calls)
    python bench/gpu_heads.py --tiny             # CPU rehearsal with the tiny model (numbers mean nothing)

What is measured, per image mode (--modes, default pad,anyres_max_9) and image (--images: 256x256, LIBERO's
frame, and 480x640, Bridge's), for each representation:
  call (ms)          median wall time of predict_action (image preprocessing, prefill, decode, un-normalize)
  prefill (ms)       from the start of generate() to the first token's logits: the vision tower, the projector
                     and one LM forward over prompt + visual tokens (parallel_l1: its one forward, which also
                     carries the H x 7 placeholders and the regression head; that is its whole model time)
  decode step (ms)   the median time between consecutive tokens (one LM forward with the KV cache, the LM head,
                     the constraint); the median, not the mean, so that another job's burst on a shared machine
                     does not move it
  tokens/chunk       tokens generated per call, the end token included (bins 8, bins_chunk 57)
  actions/s          H / call; ratios against `bins` of the same mode and image, same run, same model.
How prefill and decode are split: a LogitsProcessor appended after the policy's own constraint records
time.perf_counter() each time generate() asks it for a token (after that step's forward and LM head; on CUDA it
synchronises first), and a wrapper around the backend's generate() records its start. One call gives both
numbers for the very run whose actions/s is reported; the alternative (a second generate with
max_new_tokens=1 for the prefill) would double the calls and time a different run.

The restricted LM head (infer/restricted_head.py; VLAPolicy.restrict_head, default True, what every row above
uses) computes only the rows the constraint allows. For bins_chunk and fast the same calls are also timed with
restrict_head=False ("full head" rows); the second table gives the decode step of both and the ratio, and the
script asserts that both generated exactly the same ids (printed). Targets (issue 23): the restricted decode
step >= 1.2x faster than the full head; parallel_l1 >= 3x bins_chunk's actions/s at H = 8.

fast needs a FAST tokenizer: one is fitted here (FastCodec.fit, vocab 1024) on seeded smooth synthetic windows
(see smooth_windows), saved to a temp folder and bound like a training run would (new `<FAST_i>` rows). Every
row the VLA adds (the 256 `<ACTION_k>`, parallel_l1's slot, the `<FAST_i>`) is then set to random values like
every other row of this random model: they start at the vocabulary mean, so their logits would tie exactly and
greedy decoding would be decided by rounding, which the restricted and the full head do differently (seen with
the tiny model: the restricted head picked the 257th row, the full head the first). The untrained model emits
arbitrary FAST ids, almost never the end, so it generates the maximum length (H x 7 = 56 FAST tokens + end, like
bins_chunk) and its chunks decode as invalid (counted in policy.decode_failures, answered with zeros; fine for
speed). A trained model stops after the codec's chunk length, so the script also prints the codec's mean
tokens per chunk on held-out synthetic windows and fast's actions/s estimated at that length from the measured
call, prefill and step (call - (generated - codec length) x step).

Why this script: bench/bench_action_heads.py measures the tiny model, whose prefill is a real-width SigLIP layer
in front of a 64-wide LM, so its ratios say little about the 0.5B model (issue 23). Speed does not depend on
what the weights learned. The model is built once (random weights, built offline by
llava_vla_plugin/testing/onevision_configs.py) and shared by every policy; fast's tokens grow its embedding
(152,945 rows instead of 151,936) before anything is timed, so every representation runs the same model.
Timing: median of --calls, the rows of one image mode and image timed round robin (call 1 of every row, then
call 2, ...), so that load from other jobs falls on every row alike; after a warm-up (GPU and --tiny: 10 / 2 calls after one warm-up call per policy).
On the CPU (bf16: this CPU has avx512_bf16, where bf16 matmuls run ~2x fp32's; the GPU run is bf16 too) one
call of the 0.5B model costs 14-130 s (prefill 14-18 s with `pad` on 2 shared cores, ~0.4 s a decode step), so
the default there is 1 timed call per row after one warm-up call for the whole run (the CPU has no kernels to
compile or autotune), and the full-head rows only for the first image: the whole run then took 22 minutes
(2026-12-05, 2 cores shared with other jobs; peak RSS 3.1 GB). No DeepSpeed is imported (the GPU machine has none). The last line printed is
`parallel_l1/bins_chunk actions/s: Nx`, the smallest ratio over the modes and images measured.
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

FULL_HEAD = " (full head)"


def smooth_windows(n: int, horizon: int, seed: int):
    """n normalized windows [horizon, 7] as smooth as real robot chunks: speed of `fast` depends on its tokens
    per chunk, and a smooth chunk's DCT is a few large low-frequency coefficients that BPE merges into few
    tokens (white noise would give ~H x 7). Six arm dims: a random start plus the cumulative sum of small
    steps (a random walk of the velocity command), clipped to [-1, 1]; the gripper: -1 or 1, mostly constant
    over a chunk, switching once in 10 % of the windows."""
    import numpy as np

    rng = np.random.default_rng(seed)
    start = rng.uniform(-0.6, 0.6, (n, 1, 6))
    arm = np.clip(start + np.cumsum(rng.normal(0.0, 0.04, (n, horizon, 6)), axis=1), -1.0, 1.0)
    grip = np.repeat(rng.choice([-1.0, 1.0], (n, 1, 1)), horizon, axis=1)
    switch = rng.random(n) < 0.1
    at = rng.integers(1, horizon, n)
    for i in np.flatnonzero(switch):
        grip[i, at[i]:] *= -1
    return np.concatenate([arm, grip], axis=2).astype(np.float32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU (rehearsal; numbers mean nothing)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: cuda when present (not with --tiny), else cpu")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="auto: bfloat16 for the 0.5B model (cuda and cpu: this CPU has avx512_bf16, where bf16 "
                        "matmuls are ~2x fp32's), float32 for --tiny")
    p.add_argument("--horizon", type=int, default=8)
    p.add_argument("--calls", type=int, default=None,
                   help="timed calls per row (default 10 on cuda, 2 with --tiny, 1 on cpu: module docstring)")
    p.add_argument("--modes", default="pad,anyres_max_9")
    p.add_argument("--images", default="256x256,480x640", help="HxW of the test frames (LIBERO, Bridge)")
    p.add_argument("--full-head", default="bins_chunk,fast",
                   help="representations also timed with restrict_head=False ('' for none)")
    p.add_argument("--full-head-images", default=None,
                   help="images (HxW, comma-separated) whose full-head rows are timed (default: all of --images on "
                        "cuda and with --tiny, the first one on cpu: the head's cost per step does not depend on the "
                        "image, and each full-head row costs a whole chunk's decode)")
    p.add_argument("--fast-vocab", type=int, default=1024, help="FAST BPE vocabulary size")
    p.add_argument("--out", default=None, help="markdown file (default bench_out/gpu_heads.md; a .json beside it)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gpu_heads_"))
    os.environ.update({"HF_HOME": str(work / "hf_home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_TF": "0"})
    import numpy as np
    import torch
    from PIL import Image
    from transformers import LogitsProcessor, LogitsProcessorList

    from llava_vla_plugin.core.env import apply_env_defaults

    apply_env_defaults()
    from llava_vla_plugin.apps.tiny_model import TOWER_ID, publish_tiny_siglip
    from llava_vla_plugin.core.fast_codec import FastCodec
    from llava_vla_plugin.core.representations import ActionReprConfig, make_representation
    from llava_vla_plugin.infer.policy import VLAPolicy
    from llava_vla_plugin.testing import onevision_configs as ov

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    cuda = device == "cuda"
    if args.dtype == "auto":
        dtype = torch.float32 if args.tiny else torch.bfloat16
    else:
        dtype = getattr(torch, args.dtype)
    calls = args.calls or (10 if cuda else 2 if args.tiny else 1)
    H = args.horizon
    modes = [m for m in args.modes.split(",") if m]
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.images.split(",") if s]
    full_head = [r for r in args.full_head.split(",") if r]
    if args.full_head_images is not None:
        full_head_images = [tuple(int(v) for v in s.split("x")) for s in args.full_head_images.split(",") if s]
    else:
        full_head_images = sizes if (cuda or args.tiny) else sizes[:1]

    # ---- the FAST tokenizer, fitted on smooth synthetic windows --------------------------------------------
    fit_windows = smooth_windows(4000, H, seed=0)
    codec = FastCodec.fit(list(fit_windows), vocab_size=args.fast_vocab)
    codec_dir = work / "fast_tokenizer"
    codec.save(codec_dir)
    held_out = smooth_windows(1000, H, seed=1)
    lengths = np.array([len(codec.encode(w)) for w in held_out])
    codec_tokens = float(lengths.mean()) + 1  # + <|im_end|>, as counted for the generated chunks
    fast_info = {"vocab": codec.n_tokens, "fit_windows": len(fit_windows), "mean": float(lengths.mean()),
                 "p50": float(np.median(lengths)), "p95": float(np.percentile(lengths, 95)), "max": int(lengths.max())}
    print(f"fast codec: {codec.n_tokens} tokens fitted on {len(fit_windows)} smooth synthetic windows [{H}, 7]; "
          f"held-out tokens per chunk: mean {fast_info['mean']:.1f}, p50 {fast_info['p50']:.0f}, "
          f"p95 {fast_info['p95']:.0f}, max {fast_info['max']} (+1 end; bins_chunk: {H * 7})", flush=True)

    # ---- the model, built once ------------------------------------------------------------------------------
    t0 = time.time()
    if args.tiny:
        publish_tiny_siglip(work / "hf_home", TOWER_ID, layers=2)
        bundle = ov.build_onevision("tiny", "pad", dtype=dtype, vision_tower=TOWER_ID)
    else:
        ov.publish_random_siglip(work / "hf_home", dtype=dtype)
        bundle = ov.build_onevision("0.5b", "pad", dtype=dtype)
    model = bundle.model.to(device).eval()
    build_s = time.time() - t0
    stats = ov.example_statistics()
    reps = {}
    for name, h, options in (("bins", 1, {}), ("bins_chunk", H, {}), ("parallel_l1", H, {}),
                             ("fast", H, {"tokenizer": str(codec_dir)})):
        rep = make_representation(ActionReprConfig(name=name, horizon=h, options=options), bundle.action_tokenizer)
        rep.bind(bundle.tokenizer)
        reps[name] = rep
    torch.manual_seed(0)
    reps["parallel_l1"].prepare_model(model, bundle.tokenizer)  # a fresh head on the model (untrained)
    reps["fast"].prepare_model(model, bundle.tokenizer)  # <FAST_i> rows (grows the embedding), at the mean
    # Every row the VLA added (the 256 <ACTION_k>, parallel_l1's slot, the <FAST_i>) starts at the vocabulary mean,
    # so their logits tie exactly and an untrained model's argmax among them is decided by rounding (which the
    # restricted and the full head do differently). Random rows, like the rest of this random model, instead.
    first = int(bundle.action_tokenizer.token_ids[0])
    last = reps["fast"].first_fast_id + codec.n_tokens
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        emb = model.get_input_embeddings().weight
        params = [emb] + ([model.get_output_embeddings().weight]
                          if model.get_output_embeddings().weight is not emb else [])
        for w in params:
            std = float(w[:first].float().std())
            w[first:last] = (torch.randn(last - first, w.shape[1], generator=g) * std).to(w.device, w.dtype)
    rss_gb = _rss_peak_gb()
    print(f"model built in {build_s:.0f} s on {device} ({dtype}); {sum(x.numel() for x in model.parameters()) / 1e6:.0f}M "
          f"parameters; peak RSS {rss_gb:.1f} GB", flush=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class StepClock(LogitsProcessor):
        """Records perf_counter() when generate() picks each new token (after that step's forward)."""

        def __init__(self, stamps):
            self.stamps = stamps

        def __call__(self, input_ids, scores):
            sync()
            self.stamps.append(time.perf_counter())
            return scores

    def instrument(policy, rec: dict):
        """Wrap this policy's generate / slot_actions and constraint so each call fills `rec`."""
        backend = policy.backend
        generate, slot_actions, processors = backend.generate, backend.slot_actions, policy.logits_processor

        def timed_generate(inputs, max_new_tokens, factory):
            sync()
            rec["start"] = time.perf_counter()
            out = generate(inputs, max_new_tokens, factory)
            rec["ids"] = out[0, -max_new_tokens:].cpu().numpy()
            return out

        def timed_slots(inputs, n_slots):
            sync()
            start = time.perf_counter()
            out = slot_actions(inputs, n_slots)  # returns numpy: synchronised
            rec["start"], rec["stamps"] = start, [time.perf_counter()]
            return out

        backend.generate, backend.slot_actions = timed_generate, timed_slots
        policy.logits_processor = lambda: LogitsProcessorList([*processors(), StepClock(rec["stamps"])])

    instruction = "put the cup in the sink"
    rows, id_checks = [], []
    warm = False
    for mode in modes:
        model.config.image_aspect_ratio = mode
        for hh, ww in sizes:
            frame = Image.fromarray(np.random.default_rng(hh * ww).integers(0, 256, (hh, ww, 3), dtype=np.uint8))
            image = f"{hh}x{ww}"
            ids_by = {}
            variants = [(name, True) for name in reps]
            if (hh, ww) in full_head_images:
                variants += [(name, False) for name in reps if name in full_head]
            runs = []  # (name, restrict, policy, rec, samples)
            for name, restrict in variants:
                policy = VLAPolicy.from_upstream_model(model, bundle.tokenizer, bundle.image_processor,
                                                       bundle.action_tokenizer, stats, action_repr=reps[name],
                                                       restrict_head=restrict)
                rec = {"stamps": []}
                instrument(policy, rec)
                if cuda or args.tiny or not warm:
                    policy.predict_action(frame, instruction, unnorm_key="bridge_orig")  # warm-up
                    warm = True
                runs.append((name, restrict, policy, rec, [], policy.decode_failures))
            for _ in range(calls):  # round robin: load from other jobs falls on every row alike
                for name, restrict, policy, rec, samples, _f in runs:
                    rec["stamps"].clear()
                    sync()
                    t = time.perf_counter()
                    action = policy.predict_action(frame, instruction, unnorm_key="bridge_orig")
                    sync()
                    call = time.perf_counter() - t
                    st = rec["stamps"]
                    tokens = len(st) if reps[name].decoding == "tokens" else 0
                    step = statistics.median(np.diff(st)) if tokens > 1 else None
                    samples.append((call, st[0] - rec["start"], step, tokens, list(np.asarray(action).shape)))
            for name, restrict, policy, rec, samples, failures0 in runs:
                rep = reps[name]
                if rep.decoding == "tokens":
                    if restrict and not policy.head_restricted:
                        raise SystemExit(f"{name}: restrict_head=True but the LM head was not restricted")
                    ids = rec["ids"]
                    ends = np.flatnonzero(ids == policy.end_id)
                    ids_by[(name, restrict)] = ids[:ends[0] + 1] if len(ends) else ids
                med = lambda k: statistics.median(s[k] for s in samples if s[k] is not None) \
                    if any(s[k] is not None for s in samples) else None  # noqa: E731
                row = {"mode": mode, "image": image, "repr": name + ("" if restrict else FULL_HEAD), "name": name,
                       "horizon": rep.horizon, "restrict_head": restrict,
                       "head_restricted": bool(policy.head_restricted) if rep.decoding == "tokens" else None,
                       "shape": samples[-1][4], "call_s": med(0), "prefill_s": med(1), "step_s": med(2),
                       "tokens": med(3), "actions_per_s": rep.horizon / med(0),
                       "decode_failures": policy.decode_failures - failures0, "calls": calls}
                rows.append(row)
                print(json.dumps(row), flush=True)
            for name in full_head:
                if (name, True) in ids_by and (name, False) in ids_by:
                    a, b = ids_by[(name, True)], ids_by[(name, False)]
                    same = a.shape == b.shape and bool((a == b).all())
                    shown = " ".join(map(str, a[:10].tolist())) + (" ..." if len(a) > 10 else "")
                    print(f"ids {name} {mode} {image}: restricted {'==' if same else '!='} full head, "
                          f"{len(a)} tokens: {shown}", flush=True)
                    id_checks.append({"repr": name, "mode": mode, "image": image, "identical": same,
                                      "tokens": len(a), "restricted": a.tolist(), "full": b.tolist()})

    # ---- tables -------------------------------------------------------------------------------------------------
    def find(mode, image, repr_):
        return next((x for x in rows if x["mode"] == mode and x["image"] == image and x["repr"] == repr_), None)

    def ms(v, digits=1):
        return "-" if v is None else f"{1000 * v:.{digits}f}"

    what = "the tiny model (CPU rehearsal)" if args.tiny else "the llava-onevision-qwen2-0.5b-ov architecture, random weights"
    where = torch.cuda.get_device_name(0) if cuda else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"Action representations on {what} ({where}, torch {torch.__version__}, {dtype}, batch 1, "
             f"median of {calls} VLAPolicy.predict_action call(s) after a warm-up; {time.strftime('%Y-%m-%d')}; "
             f"model built in {build_s:.0f} s)", "",
             "| image | image mode | representation | H | call (ms) | prefill (ms) | decode step (ms) | tokens/chunk | "
             "actions/s | actions/s vs bins | prefill vs bins |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = find(r["mode"], r["image"], "bins")
        lines.append(f"| {r['image']} | {r['mode']} | {r['repr']} | {r['horizon']} | {ms(r['call_s'])} | {ms(r['prefill_s'])} | "
                     f"{ms(r['step_s'], 2)} | {'-' if not r['tokens'] else '%.0f' % r['tokens']} | {r['actions_per_s']:.2f} | "
                     f"{r['actions_per_s'] / base['actions_per_s']:.2f}x | {r['prefill_s'] / base['prefill_s']:.2f}x |")
    lines += ["", "Restricted LM head (infer/restricted_head.py) against the full head, same calls; generated ids identical: "
              "checked", "", "| image | image mode | representation | decode step restricted (ms) | decode step full (ms) | "
              "full / restricted | call full / restricted | ids identical |", "|---|---|---|---|---|---|---|---|"]
    head_ratios = []
    for r in rows:
        if r["restrict_head"] and r["name"] in full_head:
            f = find(r["mode"], r["image"], r["name"] + FULL_HEAD)
            if f is None or not r["step_s"] or not f["step_s"]:
                continue
            check = next(c for c in id_checks if (c["repr"], c["mode"], c["image"]) == (r["name"], r["mode"], r["image"]))
            ratio = f["step_s"] / r["step_s"]
            head_ratios.append(ratio)
            lines.append(f"| {r['image']} | {r['mode']} | {r['name']} | {ms(r['step_s'], 2)} | {ms(f['step_s'], 2)} | "
                         f"{ratio:.2f}x | {f['call_s'] / r['call_s']:.2f}x | {'yes' if check['identical'] else 'NO'} "
                         f"({check['tokens']} tokens) |")
    lines += ["", f"fast: the FAST tokenizer ({codec.n_tokens} tokens) gives {fast_info['mean']:.1f} tokens per chunk "
              f"(p50 {fast_info['p50']:.0f}, p95 {fast_info['p95']:.0f}, max {fast_info['max']}; +1 end) on held-out "
              f"smooth synthetic windows; bins_chunk needs {H * 7}. The untrained model generates the length in the "
              "table (invalid decodes counted: "
              + ", ".join(f"{r['mode']} {r['image']} {r['decode_failures']}/{r['calls']}" for r in rows if r["repr"] == "fast")
              + "). Estimated at the codec's length (call - (generated - codec) x step):"]
    estimates = []
    for mode in modes:
        for hh, ww in sizes:
            image = f"{hh}x{ww}"
            r, b = find(mode, image, "fast"), find(mode, image, "bins")
            if r and r["step_s"]:
                est = r["call_s"] - (r["tokens"] - codec_tokens) * r["step_s"]
                estimates.append({"mode": mode, "image": image, "call_s": est, "actions_per_s": H / est})
                lines.append(f"- {image} {mode}: {1000 * est:.0f} ms a call, {H / est:.2f} actions/s "
                             f"({H / est / b['actions_per_s']:.2f}x bins)")
    pl_ratios = []
    for mode in modes:
        for hh, ww in sizes:
            image = f"{hh}x{ww}"
            pl, bc = find(mode, image, "parallel_l1"), find(mode, image, "bins_chunk")
            if pl and bc:
                pl_ratios.append((pl["actions_per_s"] / bc["actions_per_s"], mode, image))
    lines += ["", "Targets (issue 23): restricted decode step >= 1.2x faster than the full head: "
              + (", ".join(f"{x:.2f}x" for x in head_ratios) or "not measured")
              + (f" ({'met' if min(head_ratios) >= 1.2 else 'NOT met'} everywhere)" if head_ratios else "")
              + "; parallel_l1 >= 3x bins_chunk actions/s: "
              + ", ".join(f"{x:.1f}x ({m} {i})" for x, m, i in pl_ratios)
              + (f" ({'met' if min(pl_ratios)[0] >= 3 else 'NOT met'} everywhere)" if pl_ratios else "")]
    table = "\n".join(lines) + "\n"
    out = Path(args.out) if args.out else ROOT / "bench_out" / "gpu_heads.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    out.with_suffix(".json").write_text(json.dumps(
        {"rows": rows, "id_checks": id_checks, "fast_codec": fast_info, "fast_estimates": estimates, "build_s": build_s,
         "device": where, "dtype": str(dtype), "calls": calls, "peak_rss_gb": _rss_peak_gb()}, indent=2))
    print(table)
    bad = [c for c in id_checks if not c["identical"]]
    for c in bad:  # the assertion, after the tables are written (a long CPU run keeps its numbers)
        print(f"FAILED: {c['repr']} {c['mode']} {c['image']}: restricted head ids {c['restricted']} != full head "
              f"ids {c['full']}", file=sys.stderr, flush=True)
    print(f"peak RSS {_rss_peak_gb():.1f} GB; the smallest parallel_l1/bins_chunk ratio over the modes and images:")
    worst = min(pl_ratios)[0] if pl_ratios else float("nan")
    print(f"parallel_l1/bins_chunk actions/s: {worst:.1f}x")
    return 1 if bad else 0


def _rss_peak_gb() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return float("nan")


if __name__ == "__main__":
    sys.exit(main())
