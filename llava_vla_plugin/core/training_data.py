"""Reading training data lists: our jsonl/json files and mixture YAMLs (upstream's `--data_path`
format, plus a per-entry `weight`). Pure Python, no upstream import, so it is easy to test.
"""
from __future__ import annotations

import json
import logging
import math
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from data_tools.converted_format import STATISTICS_FILE
from data_tools.training_mixture import recorded_weighting
from data_tools.weights import at_line, entry_lines, parse_weight

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSource:
    path: Path
    sampling_strategy: str = "all"
    weight: float = 1.0


def iter_raw_samples(path: Path):
    """(compact JSON bytes, parsed sample) for each sample of a .jsonl or .json file; errors name the file and line."""
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix == ".jsonl":
        with path.open("rb") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    yield line, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line") from None
        return
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of samples")
        for sample in data:
            yield json.dumps(sample, separators=(",", ":")).encode(), sample
        return
    raise ValueError(f"{path}: unsupported data file type (use .jsonl, .json or a mixture .yaml)")


def read_samples(path: Path) -> list[dict]:
    return [sample for _, sample in iter_raw_samples(path)]


def text_length(sample: dict) -> int:
    """Upstream's length proxy (words of each turn); an action list counts its tokens plus <|im_end|>."""
    n = 0
    for c in sample.get("conversations", ()):
        v = c.get("value", "")
        n += len(v) + 1 if isinstance(v, list) else len(str(v).split())
    return n


class SampleStore(Sequence):
    """The training samples, kept as their JSON text in one buffer and parsed on access.

    Millions of frames as Python dicts cost ~2.5 kB each, per rank, and forked DataLoader workers
    un-share them by touching refcounts; one bytes buffer plus integer arrays stays small and shared.
    Weighted copies are indices into the buffer, not copies. Assigned items (upstream-bound samples
    that needed an <image> token) are kept as overrides.
    """

    def __init__(self, buffer: bytes, offsets: np.ndarray, line_source: np.ndarray, sources: list[str],
                 index: np.ndarray, text_len: np.ndarray, has_media: np.ndarray):
        self._buf = buffer
        self._off = offsets
        self._line_source = line_source
        self._sources = sources
        self._index = index
        self._text_len = text_len
        self._has_media = has_media
        self._overrides: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample index {i} out of range for {len(self)} samples")
        if i in self._overrides:
            return self._overrides[i]
        line = int(self._index[i])
        sample = json.loads(self._buf[self._off[line]:self._off[line + 1]])
        sample["_source"] = self._sources[self._line_source[line]]
        return sample

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __setitem__(self, i: int, sample: dict) -> None:
        self._overrides[int(i)] = sample

    def select(self, keep: np.ndarray) -> "SampleStore":
        """The samples where `keep` is true (same buffer; for frames a training rule drops, e.g. the oft windows)."""
        if self._overrides:
            raise RuntimeError("select() before any sample was replaced")
        return SampleStore(self._buf, self._off, self._line_source, self._sources, self._index[np.asarray(keep, bool)],
                           self._text_len, self._has_media)

    def text_lengths(self) -> np.ndarray:
        return self._text_len[self._index]

    def source_indices(self) -> np.ndarray:
        """[len] the index (into `source_paths`) of the data file each sample was read from."""
        return self._line_source[self._index]

    @property
    def source_paths(self) -> list[str]:
        return list(self._sources)

    def has_media(self) -> np.ndarray:
        return self._has_media[self._index]


def parse_sources(data_path: str) -> list[DataSource]:
    """`data_path` is a jsonl/json file or a mixture YAML; relative json_paths resolve against the YAML's folder."""
    p = Path(data_path)
    if p.suffix not in (".yaml", ".yml"):
        return [DataSource(p)]
    text = p.read_text()
    try:
        spec = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML: {e}") from None
    entries = spec.get("datasets") if isinstance(spec, dict) else None
    if not entries or not isinstance(entries, list):
        raise ValueError(f"{p}: a mixture YAML needs a non-empty `datasets:` list of {{json_path, weight}} entries")
    lines = entry_lines(text)
    sources = []
    for i, e in enumerate(entries):
        where = f"{at_line(p, lines, i)}: datasets[{i}]"
        if not isinstance(e, dict) or "json_path" not in e:
            raise ValueError(f"{where} has no json_path")
        jp = Path(e["json_path"])
        if not jp.is_absolute():
            jp = (p.parent / jp)
        weight = parse_weight(e.get("weight", 1.0), f"{where} ({jp})")
        strategy = str(e.get("sampling_strategy", "all"))
        check_sampling_strategy(strategy, f"{where} ({jp})")
        sources.append(DataSource(jp, strategy, weight))
    return sources


def check_sampling_strategy(strategy: str, where: str) -> None:
    """Reject a malformed sampling_strategy when the mixture is read, naming the file and entry."""
    if strategy == "all":
        return
    kind, _, number = strategy.partition(":")
    digits = number[:-1] if number.endswith("%") else number
    if kind not in ("first", "end", "random") or not digits.isdigit():
        raise ValueError(f"{where}: unknown sampling_strategy {strategy!r} (all, first:N, end:N, random:N; "
                         "N may be a percentage such as 10%)")


def apply_sampling_strategy(samples: list, strategy: str, source: Path) -> list:
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


def apply_weight(samples: list, weight: float, rng: np.random.Generator) -> list:
    """Seeded up/down-sampling: weight w keeps floor(w) full copies plus a random fraction w - floor(w).

    How this copy multiplier relates to OpenVLA's sampling weight: data_tools/training_mixture.py's docstring.

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


def mixture_weighting(data_path: str) -> str | None:
    """The weighting rule a mixture YAML records, in words (None for a plain data file): which rule turned
    OpenVLA's weights into its multipliers, since the same weights give other shares under each rule
    (data_tools/training_mixture.py); files written before the record existed say so."""
    p = Path(data_path)
    if p.suffix not in (".yaml", ".yml"):
        return None
    return recorded_weighting(yaml.safe_load(p.read_text()) or {})


def load_data(data_path: str, seed: int = 0) -> tuple[SampleStore, list[DataSource]]:
    sources = parse_sources(data_path)
    rule = mixture_weighting(data_path)
    if rule is not None:  # once per loaded mixture, in the training log
        log.warning("mixture %s: weighting rule %s", data_path, rule)
    buf = bytearray()
    offsets, line_source, text_len, has_media, index = [0], [], [], [], []
    for k, src in enumerate(sources):
        first = len(line_source)
        for raw, sample in iter_raw_samples(src.path):
            buf += raw
            offsets.append(len(buf))
            line_source.append(k)
            text_len.append(text_length(sample))
            has_media.append("image" in sample or "video" in sample)
        n_read = len(line_source) - first
        kept = apply_sampling_strategy(list(range(first, first + n_read)), src.sampling_strategy, src.path)
        # one generator per file (seed, file name): a file's subset does not depend on the other entries
        rng = np.random.default_rng([seed, zlib.crc32(src.path.name.encode()), zlib.crc32(str(src.path.parent.name).encode())])
        kept = apply_weight(kept, src.weight, rng)
        index.extend(kept)
        log.info("read %d samples from %s -> %d after sampling=%s weight=%g", n_read, src.path, len(kept), src.sampling_strategy, src.weight)
    store = SampleStore(bytes(buf), np.asarray(offsets, dtype=np.int64), np.asarray(line_source, dtype=np.int32),
                        [str(s.path) for s in sources], np.asarray(index, dtype=np.int64),
                        np.asarray(text_len, dtype=np.int32), np.asarray(has_media, dtype=bool))
    return store, sources


def training_domains(store: SampleStore) -> tuple[list[str], np.ndarray]:
    """(sorted domain names, each sample's domain index): a sample's domain is the dataset folder of the data file it
    was read from (convert's OUT/<dataset>/train.jsonl, vla-import's the same), so every copy a mixture weight makes
    stays in its dataset's domain. Files of one folder are one domain. Used by Re-Mix (train/remix.py)."""
    names = [Path(p).parent.name or Path(p).name for p in store.source_paths]
    domains = sorted(set(names))
    of_source = np.asarray([domains.index(n) for n in names], dtype=np.int64)
    return domains, of_source[store.source_indices()] if len(store) else np.zeros(0, np.int64)


def find_statistics(sources: list[DataSource]) -> dict:
    """Merge dataset_statistics.json found beside each data file or one folder up (converter layout)."""
    stats: dict = {}
    for src in sources:
        for folder in (src.path.parent, src.path.parent.parent):
            f = folder / STATISTICS_FILE
            if f.exists():
                stats.update(json.loads(f.read_text()))
                break
    return stats
