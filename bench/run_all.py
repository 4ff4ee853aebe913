"""Run every benchmark in bench/ one after another (`make bench`); each prints its ratios against
the baseline it measures in the same run. Record the numbers in BENCHMARKS.md with machine and date."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Every bench that runs with one command and no pre-built checkpoint (each builds its tiny model itself).
# Not here: bench_closed_loop.py (needs `make eval-demo`'s checkpoint) and gpu_check.py (a GPU host).
BENCHES = ["bench_convert.py", "bench_dataset.py", "bench_train_step.py", "bench_predict.py", "bench_serve.py",
           "bench_action_heads.py", "bench_import.py"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=BENCHES, default=BENCHES, help="run these benchmarks only")
    args = ap.parse_args(argv)
    env = {**os.environ, "USE_TF": "0", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parent)}
    failed = []
    for name in args.only:
        print(f"\n===== {name} =====", flush=True)
        if subprocess.run([sys.executable, str(HERE / name)], env=env).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
