"""LLaVA-OneVision as a Vision-Language-Action model: an overlay on upstream LLaVA-NeXT.

Importing this package only sets environment defaults (cheap, no torch). The upstream hooks are
installed by `llava_vla_plugin.register.register()`, which the training entry point calls.
"""
from llava_vla_plugin.env import apply_env_defaults

apply_env_defaults()
