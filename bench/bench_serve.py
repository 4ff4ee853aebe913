"""The policy server under a burst (issue 11): requests/s and p50/p99 latency, against in-process calls.

    .venv/bin/python bench/bench_serve.py                     # tiny model, built and trained here (~1-3 min)
    .venv/bin/python bench/bench_serve.py --checkpoint CKPT   # any llava_vla_plugin checkpoint

Measured in one run, one after the other (never at the same time, so they do not share the CPU):
  server    `python -m llava_vla_plugin.infer.serve` with its defaults; --requests clients (default 200)
            connect at the same instant, each POSTs one 256x256 image to /act (json-numpy, as OpenVLA
            clients do). Latency = send to answer, queueing included; requests/s = answers / wall time.
            Every request must be answered (a refused or reset one fails the run).
  baseline  VLAPolicy.predict_action called --baseline-requests times in this process on the same
            image: what the model alone costs, no HTTP, no JSON.
  memory    (--memory) peak server RSS for --big-burst concurrent large images (--big-side pixels square)
            with --max-decodes 1 against --max-decodes = the burst size (the gate off, in effect).
Prints server/baseline requests/s (the overhead of serving; 1.0 = none) and the memory ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import http.client
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))


def start_server(ckpt: Path, env: dict, log: Path, *args: str) -> tuple[subprocess.Popen, tuple[str, int]]:
    out = open(log.with_suffix(".out"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "llava_vla_plugin.infer.serve", "--checkpoint", str(ckpt), "--port", "0",
                             "--log-level", "WARNING", *args], cwd=ROOT, env=env, stdout=out,
                            stderr=open(log.with_suffix(".err"), "w"))
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        text = log.with_suffix(".out").read_text()
        if "serving" in text:
            host, port = text.split("http://", 1)[1].split()[0].rsplit(":", 1)
            return proc, (host, int(port))
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"the server did not start:\n{log.with_suffix('.err').read_text()[-4000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def post(addr, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*addr, timeout=3600)
    try:
        conn.request("POST", "/act", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def burst(addr, bodies: list[bytes]) -> tuple[float, list[float], list]:
    """All clients released at once -> (wall seconds, per-request latencies, answers)."""
    n = len(bodies)
    barrier = threading.Barrier(n + 1)
    lat = [0.0] * n
    answers = [None] * n

    def client(i):
        barrier.wait()
        t = time.perf_counter()
        try:
            answers[i] = post(addr, bodies[i])
        except OSError as e:
            answers[i] = (type(e).__name__, str(e).encode())
        lat[i] = time.perf_counter() - t

    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(client, i) for i in range(n)]
        barrier.wait()
        t0 = time.perf_counter()
        for f in futures:
            f.result()
    return time.perf_counter() - t0, lat, answers


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values, q) -> float:
    return float(np.percentile(values, q))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoint to serve (default: build and train the tiny model in --work)")
    parser.add_argument("--work", help="folder for the tiny model and checkpoint (default: a temp dir)")
    parser.add_argument("--requests", type=int, default=200, help="concurrent clients in the burst (default 200)")
    parser.add_argument("--baseline-requests", type=int, default=30, help="in-process calls (default 30)")
    parser.add_argument("--memory", action="store_true", help="also measure peak server RSS under big images")
    parser.add_argument("--big-burst", type=int, default=5, help="concurrent big images for --memory (default 5)")
    parser.add_argument("--big-side", type=int, default=4096, help="big image side in pixels (default 4096: 48 MiB)")
    parser.add_argument("--json", help="write the numbers here too")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_serve_"))
    if not args.work:
        import atexit
        import shutil

        atexit.register(shutil.rmtree, work, ignore_errors=True)
    os.environ.setdefault("USE_TF", "0")
    os.environ["HF_HUB_OFFLINE"] = "1"
    if not args.checkpoint:
        os.environ["HF_HOME"] = str(work / "tiny" / "hf_home")  # the tiny tower resolves from here
        from bench_predict import build_checkpoint

        print("building the tiny checkpoint ...", flush=True)
        ckpt = build_checkpoint(work)
    else:
        ckpt = Path(args.checkpoint)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    import json_numpy

    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    stats = json.loads((ckpt / "dataset_statistics.json").read_text())
    key = sorted(stats)[0]
    body = json_numpy.dumps({"image": image, "instruction": "pick up the block", "unnorm_key": key}).encode()
    results: dict = {"requests": args.requests}

    # ---- server, every limit at its default
    proc, addr = start_server(ckpt, env, work / "server")
    try:
        status, first = post(addr, body)  # warm-up (first call compiles / allocates)
        if status != 200:
            sys.exit(f"/act answered {status}: {first[:500]!r}")
        print(f"burst of {args.requests} concurrent /act requests ...", flush=True)
        wall, lat, answers = burst(addr, [body] * args.requests)
    finally:
        stop_server(proc)
    bad = [a for a in answers if a[0] != 200]
    if bad:
        sys.exit(f"{len(bad)} of {args.requests} requests not answered: {bad[:3]}")
    served = json_numpy.loads(first)
    if any(not np.array_equal(json_numpy.loads(a[1]), served) for a in answers):
        sys.exit("answers under the burst differ from the lone answer")
    results["server"] = {"rps": args.requests / wall, "p50_s": pct(lat, 50), "p99_s": pct(lat, 99), "wall_s": wall}

    # ---- baseline: the model in this process
    from llava_vla_plugin.infer.policy import VLAPolicy

    policy = VLAPolicy.from_pretrained(ckpt)
    direct = policy.predict_action(image, "pick up the block", unnorm_key=key)
    if not np.array_equal(direct, served):
        sys.exit(f"the server answered {served}, predict_action {direct}")
    times = []
    t0 = time.perf_counter()
    for _ in range(args.baseline_requests):
        t = time.perf_counter()
        policy.predict_action(image, "pick up the block", unnorm_key=key)
        times.append(time.perf_counter() - t)
    base_wall = time.perf_counter() - t0
    del policy
    results["baseline"] = {"rps": args.baseline_requests / base_wall, "p50_s": statistics.median(times),
                           "p99_s": pct(times, 99)}

    s, b = results["server"], results["baseline"]
    print(f"\n| run | requests | req/s | p50 latency (s) | p99 latency (s) |\n|---|---|---|---|---|")
    print(f"| in-process predict_action, sequential | {args.baseline_requests} | {b['rps']:.2f} | {b['p50_s']:.3f} | {b['p99_s']:.3f} |")
    print(f"| server, {args.requests} concurrent clients | {args.requests} | {s['rps']:.2f} | {s['p50_s']:.2f} | {s['p99_s']:.2f} |")
    print(f"all {args.requests} answered, none refused; answers equal predict_action's")

    if args.memory:
        side, n = args.big_side, args.big_burst
        big = [json_numpy.dumps({"image": np.random.default_rng(i).integers(0, 256, (side, side, 3), dtype=np.uint8),
                                 "instruction": "pick up the block", "unnorm_key": key}).encode() for i in range(n)]
        mem = {}
        for slots in (1, n):
            proc, addr = start_server(ckpt, env, work / f"server_mem{slots}", "--max-decodes", str(slots))
            try:
                idle = peak_rss_mb(proc.pid)
                wall, _, answers = burst(addr, big)
                mem[slots] = (idle, peak_rss_mb(proc.pid), wall)
            finally:
                stop_server(proc)
            if any(a[0] != 200 for a in answers):
                sys.exit(f"big-image burst: {[a for a in answers if a[0] != 200][:2]}")
        results["memory"] = {str(k): {"rss_idle_mb": v[0], "rss_peak_mb": v[1], "wall_s": v[2]} for k, v in mem.items()}
        mb = side * side * 3 / 2**20
        print(f"\n{n} concurrent {side}x{side} images ({mb:.0f} MiB each, {len(big[0]) / 2**20:.0f} MiB of JSON):")
        for k, (idle, peak, wall) in mem.items():
            print(f"  --max-decodes {k}: server peak RSS {peak:.0f} MB (idle {idle:.0f} MB, +{peak - idle:.0f} MB), {wall:.1f} s")
        g1, gn = mem[1][1] - mem[1][0], mem[n][1] - mem[n][0]
        print(f"memory growth --max-decodes 1 / {n}: {g1 / gn:.2f}x")

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"server/in-process requests/s: {s['rps'] / b['rps']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
