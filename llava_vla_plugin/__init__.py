"""LLaVA-OneVision as a Vision-Language-Action model: an overlay on upstream LLaVA-NeXT.

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
