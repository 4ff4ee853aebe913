"""Dataset registry: OpenVLA's per-dataset standardization, loaded from YAML data.

The bundled `registry/oxe.yaml` mirrors OpenVLA's OXE_DATASET_CONFIGS + OXE_STANDARDIZATION_TRANSFORMS for
every EEF_POS dataset. Users add or override datasets with their own YAML file of the same shape
(`--registry extra.yaml`); no code is needed.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x faster on the 67-entry file
BUNDLED_REGISTRY = Path(__file__).with_name("registry") / "oxe.yaml"

PART_OPS = {"rel2abs", "invert", "binarize", "clip", "euler_from_quaternion"}
EPISODE_OPS = {"drop_first", "action", "relabel_from_state"}
FRAME_FILTERS = {"zero_action"}
LANGUAGE_DECODERS = {"utf8", "codepoints"}

REGISTER_HELP = """\
To register a custom RLDS dataset, write a YAML file and pass it with --registry FILE:

  datasets:
    my_robot_dataset:              # directory name under --data-dir
      tfds_name: my_robot_dataset  # TFDS name inside it (default: the directory name)
      images: {primary: image, wrist: wrist_image}
      language: {key: language_instruction}
      standardize:
        - action:
            - {key: action, cols: [0, 6]}
            - {key: action, cols: [-1, null], ops: [{clip: [0, 1]}, invert]}

See data_tools/registry/oxe.yaml for every op (drop_first, relabel_from_state, rel2abs, binarize, ...)."""


OXE_BUCKET = "gs://gresearch/robotics"
STATE_ENCODINGS = {"NONE", "POS_EULER", "POS_QUAT", "JOINT", "JOINT_BIMANUAL"}  # OpenVLA oxe/configs.py:33-40
VERSION_SOURCES = {"schema", "oxe_colab", "unverified", "none", "hf_repo"}


class RegistryError(ValueError):
    """A registry file is malformed or names an unknown op."""


class UnknownDatasetError(KeyError):
    """A dataset name is not in the registry; the message lists close and known names."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0])


@dataclass(frozen=True)
class PartOp:
    name: str
    args: tuple[float, ...] = ()


@dataclass(frozen=True)
class ActionPart:
    key: str | None = None
    cols: tuple[int | None, int | None] | None = None
    ops: tuple[PartOp, ...] = ()
    zeros: int = 0
    ones: int = 0


@dataclass(frozen=True)
class EpisodeOp:
    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    parts: tuple[ActionPart, ...] = ()


@dataclass(frozen=True)
class FrameFilter:
    name: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    tfds_name: str
    primary_image: str | None
    wrist_image: str | None
    language_key: str
    language_decode: str
    standardize: tuple[EpisodeOp, ...]
    state_keys: tuple[str | None, ...] = ()
    # how the standardization transform builds a state key (OpenVLA writes trajectory["observation"][key] in
    # oxe/transforms.py): key -> parts concatenated as the action's; a state key not listed is observation/<key>
    state: tuple[tuple[str, tuple[ActionPart, ...]], ...] = ()
    state_encoding: str | None = None  # OpenVLA's StateEncoding name of the proprio (documentation, manifest)
    success_key: str | None = None
    frame_filters: tuple[FrameFilter, ...] = ()
    action_normalization_mask: tuple[bool, ...] = (True,) * 6 + (False,)
    openvla_transform: str | None = None
    notes: str | None = None

    def step_keys(self, with_images: bool = True) -> list[str]:
        """Step-level keys (under steps/) the conversion must parse."""
        keys: list[str] = [self.language_key]
        for op in self.standardize:
            keys.extend(p.key for p in op.parts if p.key)
            if op.name == "relabel_from_state":
                keys.append(op.params["key"])
        if with_images and self.primary_image:
            keys.append(f"observation/{self.primary_image}")
        return list(dict.fromkeys(keys))

    def state_parts(self, key: str) -> tuple[ActionPart, ...]:
        """The parts one state_obs_key is built from: the registry's `state:` derivation, else the raw
        observation/<key> as is (OpenVLA reads traj["observation"][key], dataset.py:163)."""
        derived = dict(self.state)
        return derived.get(key, (ActionPart(key=f"observation/{key}"),))

    def proprio_source_keys(self) -> list[str]:
        """Step keys the proprio is built from (empty when the registry names no state_obs_keys)."""
        keys = [p.key for k in self.state_keys if k is not None for p in self.state_parts(k) if p.key]
        return list(dict.fromkeys(keys))


def _parse_part_op(raw: Any, where: str) -> PartOp:
    if isinstance(raw, str):
        name, args = raw, ()
    elif isinstance(raw, Mapping) and len(raw) == 1:
        name, value = next(iter(raw.items()))
        args = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    else:
        raise RegistryError(f"{where}: a part op is a name or a one-key mapping, got {raw!r}")
    if name not in PART_OPS:
        raise RegistryError(f"{where}: unknown part op {name!r}; known: {sorted(PART_OPS)}")
    if name == "clip" and len(args) != 2:
        raise RegistryError(f"{where}: clip takes [lo, hi]")
    return PartOp(name, args)


def _parse_part(raw: Mapping[str, Any], where: str) -> ActionPart:
    if not isinstance(raw, Mapping):
        raise RegistryError(f"{where}: an action part is a mapping, got {raw!r}")
    unknown = set(raw) - {"key", "cols", "ops", "zeros", "ones"}
    if unknown:
        raise RegistryError(f"{where}: unknown part fields {sorted(unknown)}")
    if ("key" in raw) + ("zeros" in raw) + ("ones" in raw) != 1:
        raise RegistryError(f"{where}: a part has exactly one of key / zeros / ones")
    cols = raw.get("cols")
    if cols is not None:
        if not (isinstance(cols, (list, tuple)) and len(cols) == 2):
            raise RegistryError(f"{where}: cols is [start, stop] (Python slice, null allowed)")
        cols = (None if cols[0] is None else int(cols[0]), None if cols[1] is None else int(cols[1]))
    ops = tuple(_parse_part_op(o, where) for o in raw.get("ops", []) or [])
    return ActionPart(
        key=raw.get("key"), cols=cols, ops=ops, zeros=int(raw.get("zeros", 0)), ones=int(raw.get("ones", 0))
    )


def _parse_episode_op(raw: Any, where: str) -> EpisodeOp:
    if isinstance(raw, str):
        name, value = raw, {}
    elif isinstance(raw, Mapping) and len(raw) == 1:
        name, value = next(iter(raw.items()))
    else:
        raise RegistryError(f"{where}: a standardize op is a name or a one-key mapping, got {raw!r}")
    if name not in EPISODE_OPS:
        raise RegistryError(f"{where}: unknown standardize op {name!r}; known: {sorted(EPISODE_OPS)}")
    if name == "action":
        if not isinstance(value, list) or not value:
            raise RegistryError(f"{where}: action takes a non-empty list of parts")
        return EpisodeOp(name, {}, tuple(_parse_part(p, f"{where}.action[{i}]") for i, p in enumerate(value)))
    params = dict(value or {})
    if name == "drop_first":
        params.setdefault("n", 1)
    if name == "relabel_from_state":
        if "key" not in params:
            raise RegistryError(f"{where}: relabel_from_state needs key")
        params.setdefault("dims", 6)
    return EpisodeOp(name, params)


@dataclass(frozen=True)
class DownloadInfo:
    """Where a dataset is downloaded from: the catalog part of a registry entry (its `download:` field)."""

    name: str
    version: str | None  # None: no public RLDS copy
    source: str  # URL template of the version folder, with {version}
    version_source: str  # the evidence for `version` (see oxe.yaml's header)
    convertible: bool = True  # False: in `download_only:` (no standardization registered)

    def url(self, version: str | None = None, source_root: str | None = None) -> str:
        version = version or self.version
        if source_root:
            return f"{source_root.rstrip('/')}/{self.name}/{version}"
        return self.source.format(version=version)


def _parse_download(name: str, raw: Any, tfds_name: str, convertible: bool) -> DownloadInfo:
    where = f"registry[{name}].download"
    if not isinstance(raw, Mapping):
        raise RegistryError(f"{where}: expected {{version, version_source[, source]}}, got {raw!r}")
    unknown = set(raw) - {"version", "version_source", "source"}
    if unknown:
        raise RegistryError(f"{where}: unknown fields {sorted(unknown)}")
    src = raw.get("version_source")
    if src not in VERSION_SOURCES:
        raise RegistryError(f"{where}: version_source must be one of {sorted(VERSION_SOURCES)}, got {src!r}")
    version = raw.get("version")
    return DownloadInfo(name, None if version is None else str(version),
                        str(raw.get("source") or f"{OXE_BUCKET}/{tfds_name}/{{version}}"), src, convertible)


def parse_entry(name: str, raw: Mapping[str, Any]) -> DatasetSpec:
    where = f"registry[{name}]"
    if not isinstance(raw, Mapping):
        raise RegistryError(f"{where}: entry must be a mapping")
    images = raw.get("images") or {}
    language = raw.get("language") or {}
    decode = language.get("decode", "utf8")
    if decode not in LANGUAGE_DECODERS:
        raise RegistryError(f"{where}: language.decode must be one of {sorted(LANGUAGE_DECODERS)}")
    ops = tuple(_parse_episode_op(o, f"{where}.standardize[{i}]") for i, o in enumerate(raw.get("standardize") or []))
    if sum(op.name == "action" for op in ops) != 1:
        raise RegistryError(f"{where}: standardize needs exactly one action op")
    filters = []
    for i, f in enumerate(raw.get("frame_filters") or []):
        if not (isinstance(f, Mapping) and len(f) == 1) or next(iter(f)) not in FRAME_FILTERS:
            raise RegistryError(f"{where}.frame_filters[{i}]: known filters: {sorted(FRAME_FILTERS)}")
        fname, params = next(iter(f.items()))
        filters.append(FrameFilter(fname, dict(params or {})))
    state_raw = raw.get("state") or {}
    if not isinstance(state_raw, Mapping):
        raise RegistryError(f"{where}.state: a mapping of state key -> list of parts")
    state = []
    for key, parts in state_raw.items():
        if not isinstance(parts, list) or not parts:
            raise RegistryError(f"{where}.state.{key}: a non-empty list of parts")
        state.append((str(key), tuple(_parse_part(p, f"{where}.state.{key}[{i}]") for i, p in enumerate(parts))))
    state_encoding = raw.get("state_encoding")
    if state_encoding is not None and state_encoding not in STATE_ENCODINGS:
        raise RegistryError(f"{where}.state_encoding: one of {sorted(STATE_ENCODINGS)}, got {state_encoding!r}")
    mask = tuple(bool(m) for m in raw.get("action_normalization_mask", [True] * 6 + [False]))
    if len(mask) != 7:
        raise RegistryError(f"{where}: action_normalization_mask needs 7 entries")
    spec = DatasetSpec(
        name=name,
        tfds_name=str(raw.get("tfds_name") or name),
        primary_image=images.get("primary"),
        wrist_image=images.get("wrist"),
        language_key=str(language.get("key", "language_instruction")),
        language_decode=decode,
        standardize=ops,
        state_keys=tuple(raw.get("state_keys") or ()),
        state=tuple(state),
        state_encoding=state_encoding,
        success_key=raw.get("success_key"),
        frame_filters=tuple(filters),
        action_normalization_mask=mask,
        openvla_transform=raw.get("openvla_transform"),
        notes=raw.get("notes"),
    )
    return spec


class Registry:
    """Name -> DatasetSpec; later files override earlier ones entry by entry."""

    def __init__(self, specs: Mapping[str, DatasetSpec], raw: Mapping[str, Mapping[str, Any]], sources: Sequence[str],
                 downloads: Mapping[str, DownloadInfo] | None = None):
        self._specs = dict(specs)
        self._raw = dict(raw)
        self.sources = list(sources)
        self._downloads = dict(downloads or {})

    @classmethod
    def load(cls, extra: Iterable[str | Path] = ()) -> "Registry":
        specs: dict[str, DatasetSpec] = {}
        raw_all: dict[str, Mapping[str, Any]] = {}
        downloads: dict[str, DownloadInfo] = {}
        sources = []
        for path in [BUNDLED_REGISTRY, *[Path(p) for p in extra]]:
            try:
                doc = yaml.load(Path(path).read_text(), Loader=_YAML_LOADER)
            except FileNotFoundError as e:
                raise RegistryError(f"registry file not found: {path}") from e
            except yaml.YAMLError as e:
                raise RegistryError(f"registry file {path} is not valid YAML: {e}") from e
            entries = (doc or {}).get("datasets") if isinstance(doc, Mapping) else None
            if not isinstance(entries, Mapping):
                raise RegistryError(f"registry file {path}: expected a top-level 'datasets:' mapping")
            for name, raw in entries.items():
                spec = specs[str(name)] = parse_entry(str(name), raw)
                # the download catalog is not part of how a dataset converts (nor of its conversion fingerprint)
                raw_all[str(name)] = {k: v for k, v in raw.items() if k != "download"}
                if "download" in raw:
                    downloads[str(name)] = _parse_download(str(name), raw["download"], spec.tfds_name, True)
            for name, raw in ((doc or {}).get("download_only") or {}).items():
                downloads[str(name)] = _parse_download(str(name), raw, str(name), False)
            sources.append(str(path))
        return cls(specs, raw_all, sources, downloads)

    def catalog(self) -> dict[str, DownloadInfo]:
        """Every dataset `data_tools.download` knows: name -> where and which version to fetch."""
        return dict(self._downloads)

    def names(self) -> list[str]:
        return sorted(self._specs)

    def raw(self, name: str) -> Mapping[str, Any]:
        return self._raw[name]

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def get(self, name: str) -> DatasetSpec:
        if name in self._specs:
            return self._specs[name]
        close = difflib.get_close_matches(name, self.names(), n=5, cutoff=0.4)
        rest = [n for n in self.names() if n not in close]
        msg = [f"unknown dataset {name!r}."]
        if close:
            msg.append("Closest known names: " + ", ".join(close) + ".")
        msg.append("Other known names: " + ", ".join(rest) + ".")
        msg.append(REGISTER_HELP)
        raise UnknownDatasetError("\n".join(msg))
