"""Environment defaults the product sets itself, so users need not know upstream's traps.

Called before transformers / upstream LLaVA-NeXT are imported (the plugin's __init__ does it).
Nothing here overrides a variable the user set.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import io
import json
import logging
import os
import re
import socket
import sys

from data_tools.quiet_imports import TF_STARTUP_LINES, import_quietly, native_stderr_filtered  # noqa: F401

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
    # TensorFlow (data tools only): INFO lines after start-up; the start-up lines: import_quietly().
    setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    install_noise_filters()
    if set_now:
        log.debug("llava_vla_plugin set environment defaults: %s", set_now)
    return set_now


# ---- known-benign noise, silenced where it is emitted --------------------------------------------
# Each entry is an exact message a dependency prints on every command although nothing is wrong for
# this product; anything else those sources print still gets through.

# upstream LLaVA-NeXT prints these at import (video and OpenCLIP towers are not used by the VLA)
UPSTREAM_IMPORT_PRINTS = {
    "llava.utils": ("Please install pyav to use video processing functions.",),
    "llava.model.multimodal_encoder.open_clip_encoder": ("OpenCLIP not installed",),
}
# upstream's LLaVATrainer.__init__ prints this for every run: it is upstream's zeroth-order (MeZO) fork of the
# trainer announcing its default mode, i.e. ordinary backprop training; the VLA trainer uses HF's loop unless
# --trainer_mode zo (trainer.py). A `zo` run's line is not in this list and still shows.
UPSTREAM_TRAINER_PRINTS = ("MeZOLLaVATrainer initialized with mode: regular",)
MISTRAL_FAMILY = ("mistral", "mistral3", "voxtral", "ministral", "pixtral")


class _MistralRegexFilter(logging.Filter):
    """transformers 4.57 warns that tokenizers saved by transformers <= 4.57.2 have Mistral's broken
    pre-tokenizer regex, for every such tokenizer, Qwen2's included. Qwen2's regex is its own and
    correct (tests/test_prompt.py checks the ids); the warning is dropped for non-Mistral models only."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "incorrect regex pattern" not in msg or "fix_mistral_regex" not in msg:
            return True
        m = re.search(r"loading from '([^']*)'", msg)
        path = m.group(1) if m else ""
        if "mistral" in path.lower():
            return True
        try:
            with open(os.path.join(path, "config.json")) as f:
                model_type = str(json.load(f).get("model_type", ""))
        except (OSError, ValueError):
            model_type = ""
        return model_type in MISTRAL_FAMILY


class _QuietImportLoader(importlib.abc.Loader):
    def __init__(self, loader, lines: tuple[str, ...]):
        self.loader, self.lines = loader, lines

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                self.loader.exec_module(module)
        finally:
            for line in buf.getvalue().splitlines(keepends=True):
                if line.rstrip("\n") not in self.lines:
                    sys.stdout.write(line)


class _QuietUpstreamImports(importlib.abc.MetaPathFinder):
    """Runs the modules of UPSTREAM_IMPORT_PRINTS with their exact known prints dropped."""

    def find_spec(self, name, path, target=None):
        if name not in UPSTREAM_IMPORT_PRINTS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _QuietImportLoader(spec.loader, UPSTREAM_IMPORT_PRINTS[name])
                return spec
        return None


def install_noise_filters() -> None:
    """Idempotent; cheap (imports nothing heavy)."""
    tok_log = logging.getLogger("transformers.tokenization_utils_base")
    if not any(isinstance(f, _MistralRegexFilter) for f in tok_log.filters):
        tok_log.addFilter(_MistralRegexFilter())
    if not any(isinstance(f, _QuietUpstreamImports) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietUpstreamImports())


@contextlib.contextmanager
def prints_dropped(lines: tuple[str, ...]):
    """Run a block with these exact stdout lines dropped; everything else it prints is replayed after it."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        for line in buf.getvalue().splitlines(keepends=True):
            if line.rstrip("\n") not in lines:
                sys.stdout.write(line)
