"""Reading training data lists: our jsonl/json files and mixture YAMLs (upstream's `--data_path`
format, plus a per-entry `weight`). Pure Python, no upstream import, so it is easy to test.
"""
from __future__ import annotations

import json
import logging
import math
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSource:
    path: Path
    sampling_strategy: str = "all"
    weight: float = 1.0


def read_samples(path: Path) -> list[dict]:
    """A .jsonl (one sample a line) or .json (a list) file; errors name the file and line."""
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix == ".jsonl":
        samples = []
        with path.open() as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    samples.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line") from None
        return samples
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of samples")
        return data
    raise ValueError(f"{path}: unsupported data file type (use .jsonl, .json or a mixture .yaml)")


def parse_sources(data_path: str) -> list[DataSource]:
    """`data_path` is a jsonl/json file or a mixture YAML; relative json_paths resolve against the YAML's folder."""
    p = Path(data_path)
    if p.suffix not in (".yaml", ".yml"):
        return [DataSource(p)]
    spec = yaml.safe_load(p.read_text()) or {}
    entries = spec.get("datasets")
    if not entries:
        raise ValueError(f"{p}: a mixture YAML needs a non-empty `datasets:` list of {{json_path, weight}} entries")
    sources = []
    for i, e in enumerate(entries):
        if "json_path" not in e:
            raise ValueError(f"{p}: datasets[{i}] has no json_path")
        jp = Path(e["json_path"])
        if not jp.is_absolute():
            jp = (p.parent / jp)
        weight = float(e.get("weight", 1.0))
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"{p}: datasets[{i}] ({jp}) has weight {weight}; weights must be finite and >= 0")
        sources.append(DataSource(jp, str(e.get("sampling_strategy", "all")), weight))
    return sources


def apply_sampling_strategy(samples: list[dict], strategy: str, source: Path) -> list[dict]:
    """Upstream's `first:N`, `end:N`, `random:N` (N may be a percentage)."""
    if strategy == "all" or ":" not in strategy:
        return samples
    kind, number = strategy.split(":", 1)
    n = math.ceil(int(number.rstrip("%")) * len(samples) / 100) if number.endswith("%") else int(number)
    if kind == "first":
        return samples[:n]
    if kind == "end":
        return samples[-n:]
    if kind == "random":
        shuffled = list(samples)
        random.Random(0).shuffle(shuffled)  # upstream uses the global RNG; seeded here for reproducibility
        return shuffled[:n]
    raise ValueError(f"{source}: unknown sampling_strategy {strategy!r} (all, first:N, end:N, random:N)")


def apply_weight(samples: list[dict], weight: float, rng: np.random.Generator) -> list[dict]:
    """Seeded up/down-sampling: weight w keeps floor(w) full copies plus a random fraction w - floor(w).

    The fraction is a prefix of one seeded permutation, so with the same seed a larger weight keeps
    every frame a smaller one kept: data-scaling runs differ only by the added data.
    """
    if weight == 1.0:
        return samples
    whole, frac = int(math.floor(weight)), weight - math.floor(weight)
    out = samples * whole
    k = int(round(frac * len(samples)))
    if k:
        idx = np.sort(rng.permutation(len(samples))[:k])
        out = out + [samples[i] for i in idx]
    return out


def load_data(data_path: str, seed: int = 0) -> tuple[list[dict], list[DataSource]]:
    sources = parse_sources(data_path)
    all_samples: list[dict] = []
    for src in sources:
        samples = read_samples(src.path)
        n_read = len(samples)
        samples = apply_sampling_strategy(samples, src.sampling_strategy, src.path)
        # one generator per file (seed, file name): a file's subset does not depend on the other entries
        rng = np.random.default_rng([seed, zlib.crc32(src.path.name.encode()), zlib.crc32(str(src.path.parent.name).encode())])
        samples = apply_weight(samples, src.weight, rng)
        source_name = str(src.path)
        for s in samples:
            s.setdefault("_source", source_name)
        log.info("read %d samples from %s -> %d after sampling=%s weight=%g", n_read, src.path, len(samples), src.sampling_strategy, src.weight)
        all_samples.extend(samples)
    return all_samples, sources


def find_statistics(sources: list[DataSource]) -> dict:
    """Merge dataset_statistics.json found beside each data file or one folder up (converter layout)."""
    stats: dict = {}
    for src in sources:
        for folder in (src.path.parent, src.path.parent.parent):
            f = folder / "dataset_statistics.json"
            if f.exists():
                stats.update(json.loads(f.read_text()))
                break
    return stats
