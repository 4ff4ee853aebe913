"""LLaVA-OneVision as a Vision-Language-Action model: an overlay on upstream LLaVA-NeXT.

Layers, bottom first (imports only go down; docs/DESIGN.md draws them, tests/test_layers.py checks):
  core/         the contracts: checkpoint files, action representations, action tokens, prompt, token
                budget, un-normalization keys, reading converted data
  train/        upstream registration, dataset, trainer, sparse head, LoRA (`python -m llava_vla_plugin.train`)
  infer/        one policy pipeline (VLAPolicy) with upstream and transformers backends; servers, eval, export
  experiments/  sweeps, scaling fits, closed-loop reports
  apps/         demos, their tiny model and RLDS fixture builders, the simulator task
  testing/      helpers for the tests only

Importing this package only sets environment defaults (cheap, no torch). The upstream hooks are
installed by `llava_vla_plugin.train.register.register()`, which the training entry point calls.
`llava_vla_plugin.VLAPolicy` (inference) is imported on first use.
"""
from llava_vla_plugin.core.env import apply_env_defaults

apply_env_defaults()


def __getattr__(name: str):
    if name == "VLAPolicy":
        from llava_vla_plugin.infer.pipeline import VLAPolicy

        return VLAPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
