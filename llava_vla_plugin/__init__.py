"""LLaVA-OneVision as a Vision-Language-Action model: an overlay on upstream LLaVA-NeXT.

Importing this package only sets environment defaults (cheap, no torch). The upstream hooks are
installed by `llava_vla_plugin.register.register()`, which the training entry point calls.
"""
from llava_vla_plugin.env import apply_env_defaults

apply_env_defaults()
def __getattr__(name): return __import__("llava_vla_plugin.policy", fromlist=["VLAPolicy"]).VLAPolicy if name == "VLAPolicy" else (_ for _ in ()).throw(AttributeError(f"module {__name__!r} has no attribute {name!r}"))  # lazy VLAPolicy: no torch at package import
