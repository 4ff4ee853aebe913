"""The action representations, as data: name -> "module:Class" under llava_vla_plugin.core.representations.

Adding a representation is one module in this package plus one line here (docs/WHERE_TO_CHANGE.md walks
through it). The classes are named as strings and imported on first use, so this module imports nothing:
the configuration (base.py) validates names against it without importing any representation, and no
representation module imports another.
"""
from __future__ import annotations

import importlib

REPRESENTATIONS: dict[str, str] = {
    "bins": "bins:BinsRepresentation",
    "bins_chunk": "bins:BinsChunkRepresentation",
    "parallel_l1": "parallel_l1:ParallelL1Representation",
    "fast": "fast:FastRepresentation",
}


def representation_class(name: str) -> type:
    """The class registered under `name` (KeyError for an unknown name: the config checks names first)."""
    module, _, cls = REPRESENTATIONS[name].partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)
