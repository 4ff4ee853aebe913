"""Upstream LLaVA-NeXT's train entry with the VLA plugin applied.

    python -m llava_vla_plugin.train [every upstream argument] [--vla_* options below]

Use it exactly like `llava/train/train_mem.py` (torchrun / deepspeed launchers included).
Bad data paths and VLA options stop it before the model loads (llava_vla_plugin/train/preflight.py, exit 2).
"""
from __future__ import annotations

import sys


def main() -> None:
    argv = sys.argv[1:]
    asks_help = any(a in ("-h", "--help") for a in argv)
    if asks_help:
        print(__doc__ + _representations_help())
    else:
        _preflight(argv)
    try:
        from llava_vla_plugin.train.register import register

        _init_cpu_deepspeed()
        register()
        if not asks_help:
            _check_fit()
            from llava_vla_plugin.train.build_lock import main_check

            main_check(argv)  # DeepSpeed's optimizer op: built now, or exit 2 on a stale build lock
        import llava.train.train as upstream_train

        upstream_train.train()
    except BaseException:
        _discard_launch_config(argv)  # only while the run has not started (the launcher's pending file is still there)
        raise
    from llava_vla_plugin.train import lora
    lora.merge_pending()  # LoRA runs: OUTPUT_DIR/merged (unless --vla_lora_merge False)
    _leave_process_group()


def _leave_process_group() -> None:
    """Every rank leaves the process group together before the interpreter exits. Without it a rank can exit
    while the collective backend's threads still serve the other one, and abort with "terminate called without
    an active exception" (SIGABRT, rc -6) after a finished run: seen once in a 2-process ZeRO-3 CPU run (gloo)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _representations_help() -> str:
    """The action representations, from the registry (core/representations/registry.py)."""
    from llava_vla_plugin.core.representations import REPRESENTATIONS, representation_class

    lines = [f"  {name:12s} {(cls.__doc__ or '').strip().splitlines()[0]}" for name, cls in ((n, representation_class(n)) for n in REPRESENTATIONS)]
    return ("\nAction representations (--vla_action_repr; the launcher's ACTION_REPR), llava_vla_plugin/core/representations.py:\n"
            + "\n".join(lines) + "\n")


def _preflight(argv) -> None:
    from llava_vla_plugin.train.preflight import problems

    found = problems(argv)
    if found:
        for line in found:
            print(f"error: {line}", file=sys.stderr)
        _discard_launch_config(argv)
        sys.exit(2)


def _discard_launch_config(argv) -> None:
    from llava_vla_plugin.train.preflight import parse
    from llava_vla_plugin.core.run_config import discard_launch_config

    output_dir = parse(argv).output_dir
    done = discard_launch_config(output_dir) if output_dir else None
    if done:
        print(f"[train] stopped before the run started: {done}", file=sys.stderr)


def _check_fit() -> None:
    """A configuration that cannot fit one frame fails here, before upstream's train() loads any weight
    (fit_check.py); exit code 2 with the numbers."""
    import logging

    from llava_vla_plugin.train.fit_check import check_config_fits
    from llava_vla_plugin.train.register import ConfigurationError

    try:
        summary = check_config_fits(sys.argv[1:])
    except ConfigurationError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if summary:
        logging.getLogger("llava_vla_plugin.train").warning(summary)


def _init_cpu_deepspeed() -> None:
    """With --use_cpu, HF sets up torch.distributed itself but not DeepSpeed's comm layer, and
    ZeRO-3's zero.Init (run while the model loads) then sees a world of 1 and rejects the batch
    sizes. Initialise it first where DeepSpeed runs on CPU processes."""
    import os

    argv = sys.argv[1:]
    if "--deepspeed" not in argv or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if "--use_cpu" not in argv or argv[argv.index("--use_cpu") + 1:][:1] not in (["True"], ["true"], ["1"]):
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


if __name__ == "__main__":
    main()
