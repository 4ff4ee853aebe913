"""The one check of a mixture `weight`, shared by every mixture format (download/convert mixtures,
`data_tools.mixture --weights`, the trainer's --data_path YAML), and where in a YAML file an entry is.

A weight must be a finite number >= 0, rejected when the file is read (not when training starts, hours
later): YAML reads `.nan`/`.inf` as floats and `weight: abc` as a string. Weight 0 is allowed (it keeps a
dataset listed but draws nothing from it) and logged as a warning, because it is more often a typo than
intent. Errors name the file and, where the YAML can be located, the line.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import yaml

log = logging.getLogger("data_tools.weights")


class WeightError(ValueError):
    """A weight that is not a finite number >= 0; the message names file, line and entry."""


def parse_weight(value: Any, where: str, name: str = "") -> float:
    """`value` as a float weight, or WeightError naming `where` (e.g. "mix.yaml:7: datasets[2] (bridge)")."""
    label = f" of {name!r}" if name else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WeightError(f"{where}: weight{label} must be a number >= 0, got {value!r}")
    w = float(value)
    if not math.isfinite(w) or w < 0:
        raise WeightError(f"{where}: weight{label} must be a finite number >= 0, got {value!r}")
    if w == 0:
        log.warning("%s: weight%s is 0: that dataset contributes no samples", where, label)
    return w


def entry_lines(text: str, key: str = "datasets") -> dict[Any, int]:
    """1-based line of each entry of a YAML document: {i: line} for the items of the top-level `key` list,
    {k: line} for the keys of a top-level mapping. {} if the text cannot be composed (the caller's parser
    reports the YAML error itself)."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    lines: dict[Any, int] = {}
    if isinstance(root, yaml.MappingNode):
        for k, v in root.value:
            lines[k.value] = k.start_mark.line + 1
            if k.value == key and isinstance(v, yaml.SequenceNode):
                for i, item in enumerate(v.value):
                    lines[i] = item.start_mark.line + 1
    return lines


def at_line(path: Any, lines: dict[Any, int], item: Any) -> str:
    """"path:line" when the line of `item` is known, else "path"."""
    line = lines.get(item)
    return f"{path}:{line}" if line else str(path)
