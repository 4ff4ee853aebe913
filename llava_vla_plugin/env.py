"""Environment defaults the product sets itself, so users need not know upstream's traps.

Called before transformers / upstream LLaVA-NeXT are imported (the plugin's __init__ does it).
Nothing here overrides a variable the user set.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import socket

log = logging.getLogger(__name__)


def hub_reachable(host: str = "huggingface.co", timeout: float = 1.5) -> bool:
    """A cheap TCP probe: on air-gapped nodes DNS fails at once, so this costs milliseconds there."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def default_attn_implementation() -> str:
    # Upstream defaults to flash_attention_2 and raises where flash-attn is missing (every CPU box).
    return "flash_attention_2" if flash_attn_available() else "sdpa"


def apply_env_defaults() -> dict[str, str]:
    """Set the variables upstream needs; return what was set (for logging)."""
    set_now: dict[str, str] = {}

    def setdefault(key: str, value: str) -> None:
        if key not in os.environ:
            os.environ[key] = value
            set_now[key] = value

    # transformers 4.x with Keras 3 installed (tensorflow-cpu for the data tools) breaks
    # `import transformers.trainer` unless the TF backend is off.
    setdefault("USE_TF", "0")
    setdefault("TOKENIZERS_PARALLELISM", "false")
    # llava/conversation.py fetches a tokenizer at import and retries ~60 s without a network.
    if "HF_HUB_OFFLINE" not in os.environ and not hub_reachable():
        setdefault("HF_HUB_OFFLINE", "1")
        setdefault("TRANSFORMERS_OFFLINE", "1")
    if set_now:
        log.debug("llava_vla_plugin set environment defaults: %s", set_now)
    return set_now
