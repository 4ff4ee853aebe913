"""Upstream LLaVA-NeXT's train entry with the VLA plugin applied.

    python -m llava_vla_plugin.train [every upstream argument] [--vla_* options below]

Use it exactly like `llava/train/train_mem.py` (torchrun / deepspeed launchers included).
"""
from __future__ import annotations

import sys


def main() -> None:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
    from llava_vla_plugin.register import register

    _init_cpu_deepspeed()
    register()
    if not any(a in ("-h", "--help") for a in sys.argv[1:]):
        _check_fit()
        from llava_vla_plugin.build_lock import main_check

        main_check(sys.argv[1:])  # DeepSpeed's optimizer op: built now, or exit 2 on a stale build lock
    import llava.train.train as upstream_train

    upstream_train.train()
    from llava_vla_plugin import lora

    lora.merge_pending()  # LoRA runs: OUTPUT_DIR/merged (unless --vla_lora_merge False)


def _check_fit() -> None:
    """A configuration that cannot fit one frame fails here, before upstream's train() loads any weight
    (fit_check.py); exit code 2 with the numbers."""
    import logging

    from llava_vla_plugin.fit_check import check_config_fits
    from llava_vla_plugin.register import ConfigurationError

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
