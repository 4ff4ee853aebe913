"""The download spec (a "mixture file"): which OXE datasets to fetch, from where, how much of each.

One of the project's two mixture concepts, named apart: this one says what to download (and convert:
`data_tools.convert --mixture` reads the same file, and data_tools/mixtures/*.yaml are presets of it);
the training mixture (upstream's --data_path YAML of {json_path, weight}) is planned by
data_tools/training_mixture.py and read by llava_vla_plugin/core/training_data.py. `weight` here is OpenVLA's
sampling weight; what it means for training is documented once, in data_tools/training_mixture.py.

A spec is a YAML file a user edits::

    name: my_mix                      # optional, defaults to the file name
    source_root: gs://gresearch/robotics   # optional; where <name>/<version> live by default
    datasets:
      - name: kuka
        version: 0.1.0                # optional for known datasets
        fraction: 0.07                # share of train shards to fetch, in (0, 1]
        weight: 0.83                  # training sampling weight (used by the converter/trainer)
        filter_success: true          # preparation options, applied later by the converter
      - name: bridge_orig             # its default source is the Bridge release site (HTTPS)

Everything is validated on load, before anything is fetched.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from data_tools.registry import OXE_BUCKET, Registry
from data_tools.weights import WeightError, at_line, entry_lines, parse_weight

__all__ = [
    "OXE_BUCKET",
    "KNOWN_DATASETS",
    "MIXTURES_DIR",
    "DatasetEntry",
    "Mixture",
    "MixtureError",
    "load_mixture",
    "named_mixtures",
    "resolve_mixture_path",
]

MIXTURES_DIR = Path(__file__).resolve().parent / "mixtures"

# The dataset catalog (default versions, download sources, the evidence for each version) is the registry's
# (data_tools/registry/oxe.yaml, each entry's `download:`); this is a read-only view of it. None marks
# datasets with no public RLDS copy (LIBERO, T-DROID, DROID-wipe).
_CATALOG = Registry.load().catalog()
KNOWN_DATASETS: dict[str, str | None] = {name: info.version for name, info in sorted(_CATALOG.items())}


class MixtureError(ValueError):
    """A mixture file that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of a mixture."""

    name: str
    version: str
    fraction: float = 1.0
    weight: float = 1.0
    source: str = ""  # URL of the dataset's version folder (gs://, https://, file:// or a local path)
    filter_success: bool = False
    flip_image_channels: bool = False
    flip_wrist_image_channels: bool = False

    @property
    def options(self) -> dict[str, bool]:
        """The preparation options the converter applies."""
        return {
            "filter_success": self.filter_success,
            "flip_image_channels": self.flip_image_channels,
            "flip_wrist_image_channels": self.flip_wrist_image_channels,
        }


@dataclass(frozen=True)
class Mixture:
    name: str
    datasets: tuple[DatasetEntry, ...]
    path: Path | None = None
    description: str = ""

    def __getitem__(self, name: str) -> DatasetEntry:
        for entry in self.datasets:
            if entry.name == name:
                return entry
        raise KeyError(name)

    @property
    def weights(self) -> dict[str, float]:
        return {d.name: d.weight for d in self.datasets}


_FIELDS = {f.name: f for f in dataclasses.fields(DatasetEntry)}
_BOOL_FIELDS = {"filter_success", "flip_image_channels", "flip_wrist_image_channels"}
_TOP_KEYS = {"name", "description", "source_root", "datasets"}


def closest_names(name: str, n: int = 3) -> list[str]:
    return difflib.get_close_matches(name, list(KNOWN_DATASETS), n=n, cutoff=0.5)


def _default_source(name: str, version: str, source_root: str | None) -> str:
    return _CATALOG[name].url(version, source_root)


def _entry(raw: Any, where: str, source_root: str | None) -> DatasetEntry:
    if isinstance(raw, str):  # "- kuka" is shorthand for {name: kuka}
        raw = {"name": raw}
    if not isinstance(raw, Mapping):
        raise MixtureError(f"{where}: expected a mapping with at least `name`, got {raw!r}")
    unknown = set(raw) - set(_FIELDS)
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(str(k), _FIELDS, 1)) else repr(k)
                 for k in sorted(map(str, unknown))]
        raise MixtureError(f"{where}: unknown key(s) {', '.join(hints)}; allowed: {', '.join(_FIELDS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise MixtureError(f"{where}: `name` is required and must be a string")
    where = f"{where} ({name})"
    explicit_source = raw.get("source")
    if name not in KNOWN_DATASETS and not explicit_source:
        close = closest_names(name)
        hint = f"; closest known names: {', '.join(close)}" if close else ""
        raise MixtureError(f"{where}: unknown dataset {name!r}{hint} (set `source:` to use a dataset of your own)")
    version = raw.get("version", KNOWN_DATASETS.get(name))
    if version is None:
        raise MixtureError(f"{where}: no default version or public source; set `version` and `source`")
    version = str(version)

    fraction = raw.get("fraction", 1.0)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise MixtureError(f"{where}: `fraction` must be a number in (0, 1], got {fraction!r}")
    if not 0.0 < float(fraction) <= 1.0:
        raise MixtureError(f"{where}: `fraction` must be in (0, 1], got {fraction}")
    try:
        weight = parse_weight(raw.get("weight", 1.0), where)
    except WeightError as e:
        raise MixtureError(str(e)) from None
    for key in _BOOL_FIELDS & set(raw):
        if not isinstance(raw[key], bool):
            raise MixtureError(f"{where}: `{key}` must be true or false, got {raw[key]!r}")
    if explicit_source is not None and not isinstance(explicit_source, str):
        raise MixtureError(f"{where}: `source` must be a URL or path string")
    if not explicit_source and KNOWN_DATASETS.get(name, "") is None:
        raise MixtureError(f"{where}: {name} has no public source; set `source:`")

    return DatasetEntry(
        name=name,
        version=version,
        fraction=float(fraction),
        weight=float(weight),
        source=explicit_source or _default_source(name, version, source_root),
        **{k: raw[k] for k in _BOOL_FIELDS & set(raw)},
    )


def parse_mixture(data: Any, name: str = "mixture", path: Path | None = None,
                  source_root: str | None = None, lines: Mapping[Any, int] | None = None) -> Mixture:
    """Validate an already-parsed YAML document. `source_root`, when given, replaces the file's
    `source_root` and the shipped default sources (download --source-root: a local copy of the bucket);
    `lines`: data_tools.weights.entry_lines of its text, for file:line errors."""
    where = str(path) if path else name
    if not isinstance(data, Mapping):
        raise MixtureError(f"{where}: expected a mapping with a `datasets` list at the top")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise MixtureError(f"{where}: unknown top-level key(s) {sorted(map(str, unknown))}; allowed: {sorted(_TOP_KEYS)}")
    raw_datasets = data.get("datasets")
    if not isinstance(raw_datasets, list) or not raw_datasets:
        raise MixtureError(f"{where}: `datasets` must be a non-empty list")
    if source_root is None:
        source_root = data.get("source_root")
    if source_root is not None and not isinstance(source_root, str):
        raise MixtureError(f"{where}: `source_root` must be a URL or path string")
    entries: list[DatasetEntry] = []
    for i, raw in enumerate(raw_datasets):
        entry = _entry(raw, f"{at_line(where, dict(lines or {}), i)}: datasets[{i}]", source_root)
        if any(e.name == entry.name for e in entries):
            raise MixtureError(f"{where}: datasets[{i}]: {entry.name!r} is listed twice")
        entries.append(entry)
    return Mixture(
        name=str(data.get("name") or name), datasets=tuple(entries), path=path,
        description=str(data.get("description") or ""),
    )


def named_mixtures() -> dict[str, Path]:
    """The mixture files shipped with data_tools (name -> path)."""
    return {p.stem: p for p in sorted(MIXTURES_DIR.glob("*.yaml"))}


def resolve_mixture_path(spec: str | Path) -> Path:
    """A path, or the name of a shipped mixture (e.g. `oxe_magic_soup_plus`)."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = named_mixtures()
    if str(spec) in shipped:
        return shipped[str(spec)]
    close = difflib.get_close_matches(str(spec), shipped, n=3, cutoff=0.5)
    hint = f"; closest shipped mixtures: {', '.join(close)}" if close else f"; shipped: {', '.join(shipped)}"
    raise MixtureError(f"mixture file {str(spec)!r} not found{hint}")


def load_mixture(spec: str | Path, source_root: str | None = None) -> Mixture:
    """Load and validate a mixture file (path or shipped name); raises MixtureError.
    `source_root` overrides where datasets without an explicit `source:` come from."""
    path = resolve_mixture_path(spec)
    try:
        text = path.read_text()
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise MixtureError(f"{path}: not valid YAML: {err}") from None
    except OSError as err:
        raise MixtureError(f"{path}: cannot read: {err}") from None
    return parse_mixture(data, name=path.stem, path=path, source_root=source_root, lines=entry_lines(text))
