"""Run configuration files of scripts/finetune_ov_vla.sh (stdlib + PyYAML only: it runs before training).

    launch_config.py read CONFIG.yaml        print shell assignments for the launcher to eval: a key
                                             already set in the environment is left alone (env wins)
    launch_config.py write OUT.yaml K=V ... [-- EXTRA ARGS]
                                             write the resolved settings (and extra trainer arguments)
    launch_config.py cpu-deepspeed DS.json   print the DeepSpeed config as one JSON string, with
                                             torch's AdamW in place of a JIT-compiled Adam (CPU hosts)

A config file is a YAML mapping of launcher variables (MODEL, DATA, NUM_GPUS, ...) plus an optional
ARGS list of extra trainer arguments, e.g.

    MODEL: lmms-lab/llava-onevision-qwen2-0.5b-ov
    DATA: converted/mixture.yaml
    NUM_GPUS: 8
    ARGS: [--report_to, wandb]

Every launch writes OUTPUT_DIR/launch_config.yaml in this format with absolute paths, so
`CONFIG=runs/x/launch_config.yaml bash scripts/finetune_ov_vla.sh` replays the run.
"""
from __future__ import annotations

import os
import re
import shlex
import sys

import yaml

NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


def read(path: str) -> str:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise SystemExit(f"CONFIG={path}: cannot read it ({e.strerror})")
    except yaml.YAMLError as e:
        raise SystemExit(f"CONFIG={path}: not valid YAML: {e}")
    if not isinstance(data, dict):
        raise SystemExit(f"CONFIG={path}: expected a mapping of launcher variables (MODEL: ..., NUM_GPUS: ...)")
    lines = []
    extra = data.pop("ARGS", None) or []
    if not isinstance(extra, list):
        raise SystemExit(f"CONFIG={path}: ARGS must be a list of trainer arguments, e.g. [--report_to, wandb]")
    for key, value in data.items():
        if not NAME.match(str(key)):
            raise SystemExit(f"CONFIG={path}: {key!r} is not a launcher variable (upper case, e.g. NUM_GPUS); "
                             "trainer arguments go in the ARGS list")
        if key in os.environ:  # the environment overrides the file
            continue
        text = "" if value is None else (str(value).lower() if isinstance(value, bool) else str(value))
        lines.append(f"{key}={shlex.quote(text)}")
    lines.append("CONFIG_ARGS=(" + " ".join(shlex.quote(str(a)) for a in extra) + ")")
    return "\n".join(lines)


def write(path: str, pairs: list[str], extra: list[str]) -> None:
    data: dict = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        parsed = yaml.safe_load(value) if value else None  # 8 -> int, True -> bool; paths stay strings
        data[key] = parsed if isinstance(parsed, (int, float, bool, type(None))) else value
    data["ARGS"] = extra
    tmp = path + ".tmp"
    final = path.replace(".pending.yaml", ".yaml")
    with open(tmp, "w") as f:
        f.write("# Resolved settings of scripts/finetune_ov_vla.sh for this run. Replay it with\n"
                f"#   CONFIG={final} bash scripts/finetune_ov_vla.sh\n"
                "# (environment variables still override the values below).\n")
        yaml.safe_dump(data, f, sort_keys=False, default_flow_style=False)
    os.replace(tmp, path)


def cpu_deepspeed(path: str) -> str:
    """The DeepSpeed config for CPU processes (no CUDA): DeepSpeed's Adam for CPU parameters is an op it
    JIT-compiles on first use (FusedAdam's CPU build, 2-6 minutes once per machine and environment, and
    a build interrupted by a signal leaves a lock that llava_vla_plugin/train/build_lock.py reports). On CPU it
    gains nothing over torch's AdamW, the same update, so `torch_adam` is set and nothing is compiled.
    An offloaded optimizer (DeepSpeedCPUAdam) and non-Adam optimizers are left as they are. The file on
    disk is not changed; transformers accepts the config as a JSON string in place of a path."""
    import json

    with open(path) as f:
        config = json.load(f)
    optimizer = config.get("optimizer") or {}
    offload = ((config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device", "none")
    if str(optimizer.get("type", "")).lower() in ("adam", "adamw") and offload in (None, "none"):
        optimizer.setdefault("params", {})["torch_adam"] = True
    return json.dumps(config, separators=(",", ":"))


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "cpu-deepspeed":
        print(cpu_deepspeed(argv[1]))
        return 0
    if len(argv) >= 2 and argv[0] == "read":
        print(read(argv[1]))
        return 0
    if len(argv) >= 2 and argv[0] == "write":
        rest = argv[2:]
        cut = rest.index("--") if "--" in rest else len(rest)
        write(argv[1], rest[:cut], rest[cut + 1:])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
