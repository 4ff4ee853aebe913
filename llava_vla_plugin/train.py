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

    register()
    import llava.train.train as upstream_train

    upstream_train.train()


if __name__ == "__main__":
    main()
