"""Convert RLDS datasets into LLaVA JSON samples exactly as OpenVLA's data pipeline sees them.

    python -m data_tools.convert --data-dir DIR (--mixture FILE | --datasets a,b) --out OUT

Per dataset: OpenVLA's standardization (data_tools/registry/oxe.yaml), statistics over split="all"
before skip_unlabeled, BOUNDS_Q99 normalization, skip_unlabeled, OpenVLA's train/val splits, stored
JPEG bytes copied unchanged. Every camera and the state as OpenVLA's make_dataset_from_rlds reads them with
load_camera_views including "wrist" and load_proprio=True: the wrist frames under images_wrist/ (a missing one
is OpenVLA's zero image: no file, counted in manifest.json `views`), the proprio in <split>_proprio.npz and
its statistics (`source: "state"`); data_tools/converted_format.py says how. Work is split into units (one shard file of one split); each unit writes
to a temporary directory renamed when complete, so a killed run resumes where it stopped, and output
is byte-identical for any --workers. A dataset directory appears under OUT only when it is complete.
OUT/mixture.yaml turns the spec's OpenVLA weights into copy multipliers under --weighting (default
`balanced`: OpenVLA's w x num_transitions, whatever --frames-per-episode kept; data_tools/training_mixture.py).

A finished or partial conversion is reused only if its fingerprint matches: the options, the registry entry
and the source's content (`source_digest`), so a replaced source is refused with a message, never skipped
as "already converted" or resumed into a mix. Each copied JPEG's structure is checked (SOI, segments, EOI;
`--verify-images` decodes it in full): a damaged frame is skipped, counted under
dropped_frames["corrupt_image"] and listed in manifest.json. An episode whose instruction contains
"<image>" is skipped and counted (the trainer would strip the token and train on another instruction).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import yaml

from data_tools.atomic import OutputWriteError, atomic_open, write_file, write_text
from data_tools.converted_format import (
    EEF_POS_ABSOLUTE_MASK,
    IMAGE_TOKEN,
    MANIFEST_FILE,
    MIXTURE_FILE,
    PROPRIO_PADDING,
    PROPRIO_SOURCE_STATE,
    STATISTICS_FILE,
    TRAIN_FILE,
    WRIST_IMAGES_DIR,
    ConvertedSample,
    EpisodeActions,
    episode_actions_file,
    episode_proprio_file,
    image_relpath,
    padding_columns,
    split_file,
    wrist_image_path,
)
from data_tools.images import (
    ImageDecodeError,
    MissingImageError,
    frame_jpeg,
    jpeg_structure_problem,
    verify_decodes,
)
from data_tools.normalize import (
    compute_statistics,
    load_published_statistics,
    normalize_bounds_q99,
    proprio_statistics,
    with_mask,
    zero_action_keep_mask,
)
from data_tools.registry import Registry, RegistryError, UnknownDatasetError, parse_entry
from data_tools.rlds_io import CorruptRecordError, LeafSpec, iter_tfrecord, parse_episode
from data_tools.transforms import Episode, build_proprio, standardize
from data_tools.weights import parse_weight
from data_tools.training_mixture import DEFAULT_WEIGHTING, MixtureToolError, add_weighting_flags, check_weighting

# 2: the wrist view (images_wrist/, `image_wrist`), <split>_proprio.npz and the proprio statistics' `source`.
# Part of the fingerprint: a folder (or partial run) converted by version 1 is refused, never mixed with 2.
TOOL_VERSION = "data_tools.convert 2"
WORK_DIR = ".work"

log = logging.getLogger("data_tools.convert")


# ----------------------------------------------------------------------------------------------
# What to convert


@dataclass(frozen=True)
class DatasetRequest:
    name: str
    version: str | None = None
    weight: float = 1.0
    filter_success: bool = False
    flip_image_channels: bool = False
    flip_wrist_image_channels: bool = False


def _truthy(entry: Mapping[str, Any], key: str) -> bool:
    options = entry.get("options") or {}
    return bool(options.get(key, entry.get(key, False)))


def requests_from_mixture(path: str | Path) -> list[DatasetRequest]:
    """Datasets of a mixture file (a path or a shipped mixture name such as `rtx`).

    data_tools.download_spec (the download mixture format) validates it; a file it rejects, e.g. one naming a
    custom dataset registered with --registry and no download source, is read leniently here: `datasets:`
    as a list of {name, version, weight, filter_success, flip_*} (options may also sit under `options:`).
    """
    try:
        from data_tools.download_spec import MixtureError, load_mixture
    except ImportError:  # pragma: no cover - the download tool is optional for conversion
        load_mixture, MixtureError = None, ValueError
    if load_mixture is not None:
        try:
            mix = load_mixture(path)
            return [
                DatasetRequest(e.name, e.version, e.weight, e.filter_success, e.flip_image_channels,
                               e.flip_wrist_image_channels)
                for e in mix.datasets
            ]
        except MixtureError as e:
            if not Path(path).is_file():
                raise ValueError(str(e)) from e
            log.info("mixture %s is not a download mixture (%s); reading it leniently", path, e)
    doc = yaml.safe_load(Path(path).read_text()) or {}
    entries = doc.get("datasets") if isinstance(doc, Mapping) else None
    if isinstance(entries, Mapping):
        entries = [{"name": k, **(v or {})} for k, v in entries.items()]
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"mixture {path}: expected a non-empty 'datasets:' list")
    out = []
    for e in entries:
        if isinstance(e, str):
            e = {"name": e}
        if "name" not in e:
            raise ValueError(f"mixture {path}: entry without a name: {e!r}")
        out.append(
            DatasetRequest(
                name=str(e["name"]),
                version=None if e.get("version") is None else str(e["version"]),
                weight=parse_weight(e.get("weight", 1.0), f"mixture {path}: {e['name']}"),
                filter_success=_truthy(e, "filter_success"),
                flip_image_channels=_truthy(e, "flip_image_channels"),
                flip_wrist_image_channels=_truthy(e, "flip_wrist_image_channels"),
            )
        )
    return out


@dataclass
class RunOptions:
    frames_per_episode: int | None = None
    seed: int = 0
    stats_from: str | None = None
    verify_images: bool = False  # decode every copied JPEG in full (the structure check always runs)


# ----------------------------------------------------------------------------------------------
# Planning (main process; uses tfds for the layout)


def _version_key(v: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in v.split("."))


def find_dataset_dir(data_dir: Path, name: str, version: str | None, tfds_name: str) -> Path:
    """DIR/<name>/<version> (the directory may hold another tfds name), else DIR/<tfds_name>/<version>."""
    tried = []
    for base in dict.fromkeys([data_dir / name, data_dir / tfds_name]):
        if version:
            cands = [base / version]
        else:
            cands = sorted(
                (p for p in base.glob("*") if (p / "dataset_info.json").is_file()),
                key=lambda p: _version_key(p.name),
                reverse=True,
            )
        for c in cands:
            if (c / "dataset_info.json").is_file():
                return c
        tried.append(str(base / (version or "<version>")))
    raise FileNotFoundError(f"dataset {name!r}: no TFDS directory (dataset_info.json) at {' or '.join(tried)}")


@dataclass
class Unit:
    dataset: str
    unit_id: str
    path: str
    skip: int
    take: int
    source_split: str
    global_start: int
    routes: list[tuple[int, int, str]]  # [lo, hi) global index ranges -> our split


@dataclass
class DatasetPlan:
    request: DatasetRequest
    spec_raw: dict[str, Any]
    dataset_dir: str
    tfds_name: str
    tfds_version: str
    split_sources: dict[str, str]
    split_sizes: dict[str, int]
    leaves: dict[str, LeafSpec]
    units: list[Unit]
    fingerprint: str = ""
    shards: list[dict[str, Any]] = field(default_factory=list)
    source_digest: str = ""
    options_digest: str = ""
    # the same version requested explicitly or left to the newest on disk (a mixture names it, --datasets
    # does not): other spellings of this plan's options digest, one conversion either way
    equivalent_options_digests: tuple[str, ...] = ()
    inputs: dict[str, Any] = field(default_factory=dict)  # what the options digest covers, compared field by field
    wrist_key: str | None = None  # the wrist camera's step key (observation/...), None: no wrist view
    views_note: str | None = None  # why a registry wrist camera is not read (the source lacks it)
    proprio: dict[str, Any] = field(default_factory=dict)  # proprio_plan(): written?, keys, columns / reason

    def fingerprint_parts(self) -> dict[str, str]:
        return {"source": self.source_digest, "options": self.options_digest}


def plan_dataset(data_dir: Path, req: DatasetRequest, registry: Registry, opts: RunOptions) -> DatasetPlan:
    from data_tools.quiet_imports import import_quietly

    tfds = import_quietly("tensorflow_datasets")  # without TensorFlow's start-up lines

    from data_tools.rlds_io import feature_leaves

    spec = registry.get(req.name)
    if not spec.primary_image:
        raise RegistryError(
            f"dataset {req.name!r} has no primary camera in the registry (OpenVLA feeds a padding image); "
            "register an override with images.primary to convert it"
        )
    if opts.stats_from:
        load_published_statistics(opts.stats_from, req.name)  # fail before any work, not after
    # absolute: tfds returns shard file names that include a relative builder directory, so joining them to a
    # relative ds_dir again would double it (data/kuka/0.1.0/data/kuka/0.1.0/...)
    ds_dir = find_dataset_dir(Path(data_dir).resolve(), req.name, req.version, spec.tfds_name)
    builder = tfds.builder_from_directory(str(ds_dir))
    info = builder.info
    leaves = feature_leaves(info.features)
    splits = info.splits
    if "train" not in splits:
        raise ValueError(f"{ds_dir}: no 'train' split (has {list(splits)})")
    n_train = splits["train"].num_examples
    if "val" in splits:
        routes = {"train": [(0, n_train, "train")], "val": [(0, splits["val"].num_examples, "val")]}
        sources = {"train": "train", "val": "val"}
    else:
        boundary = splits["train[:95%]"].num_examples  # tfds' own rounding of OpenVLA's split string
        routes = {"train": [(0, boundary, "train"), (boundary, n_train, "val")]}
        sources = {"train": "train[:95%]", "val": "train[95%:]"}
    units: list[Unit] = []
    shards = []
    for split_name in splits.keys():  # split="all": every split, test included, for the statistics
        start = 0
        for i, fi in enumerate(splits[split_name].file_instructions):
            path = fi.filename if os.path.isabs(str(fi.filename)) else str(ds_dir / fi.filename)
            take = fi.take if fi.take is not None and fi.take >= 0 else fi.examples_in_shard - fi.skip
            units.append(
                Unit(req.name, f"{split_name}-{i:05d}", path, fi.skip, take, split_name, start, routes.get(split_name, []))
            )
            shards.append({"split": split_name, "file": os.path.basename(path), "episodes": take})
            start += take
    split_sizes = {s: sum(hi - lo for r in routes.values() for lo, hi, dst in r if dst == s) for s in ("train", "val")}
    plan = DatasetPlan(
        request=req,
        spec_raw=json.loads(json.dumps(registry.raw(req.name))),
        dataset_dir=str(ds_dir),
        tfds_name=info.name,
        tfds_version=str(info.version),
        split_sources=sources,
        split_sizes=split_sizes,
        leaves=leaves,
        units=units,
        shards=shards,
    )
    plan.source_digest = source_digest(ds_dir, [u.path for u in units])
    plan.wrist_key, plan.views_note = wrist_plan(spec, leaves)
    plan.proprio = proprio_plan(spec, leaves)

    def options_digest(version: str | None) -> str:
        return _json_digest(
            {
                "tool": TOOL_VERSION,
                "request": {k: v for k, v in asdict(req).items() if k != "weight"} | {"version": version},  # weight: mixture only
                "spec": plan.spec_raw,
                "shards": shards,
                "frames_per_episode": opts.frames_per_episode,
                "seed": opts.seed,
                "stats_from": _file_digest(opts.stats_from),
                # verify_images is not here: it only decides whether more damaged frames are found
            }
        )

    plan.options_digest = options_digest(req.version)
    plan.equivalent_options_digests = tuple(dict.fromkeys(options_digest(v) for v in (None, plan.tfds_version)))
    plan.fingerprint = _json_digest({"source": plan.source_digest, "options": plan.options_digest})
    plan.inputs = {
        "tool_version": TOOL_VERSION,
        "tfds_version": plan.tfds_version,
        "options": {**{k: v for k, v in asdict(req).items() if k not in ("name", "version", "weight")},
                    "frames_per_episode": opts.frames_per_episode, "seed": opts.seed},
        "registry_entry": plan.spec_raw,
        "shards": shards,
        "stats_from": opts.stats_from,
    }
    return plan


WRIST_MISSING_RULE = ("OpenVLA: a missing camera is a zero image (make_dataset_from_rlds pads a None image key with "
                      "an empty string, dataset.py:146-147; decode_and_resize makes it zeros, obs_transforms.py:67-69; "
                      "add_pad_mask_dict marks it padding, traj_transforms.py:95-96). No file is written: the sample "
                      "has no image_wrist")


def wrist_plan(spec: Any, leaves: Mapping[str, LeafSpec]) -> tuple[str | None, str | None]:
    """(the wrist camera's step key, None) where the registry names one (OpenVLA image_obs_keys["wrist"], read
    with load_camera_views including "wrist") and the source has it; else (None, why not or None)."""
    if not spec.wrist_image:
        return None, None
    key = f"observation/{spec.wrist_image}"
    leaf = leaves.get(f"steps/{key}")
    if leaf is None or leaf.kind not in ("image", "tensor"):
        return None, f"the registry's wrist camera {key!r} is not an image feature of the source: treated as absent"
    return key, None


def _part_width(part: Any, leaves: Mapping[str, LeafSpec]) -> int:
    if part.zeros or part.ones:
        return part.zeros or part.ones
    shape = leaves[f"steps/{part.key}"].shape
    width = int(np.prod([d or 1 for d in shape])) if shape else 1
    return len(range(width)[slice(*part.cols)]) if part.cols is not None else width


def proprio_plan(spec: Any, leaves: Mapping[str, LeafSpec]) -> dict[str, Any]:
    """Whether OpenVLA's proprio (load_proprio=True: state_obs_keys, dataset.py:157-168) is built, from which
    keys, and its columns; or why not (no state_obs_keys in the registry, or a key the source lacks)."""
    if not spec.state_keys:
        return {"written": False, "reason": "the registry names no state_obs_keys (OpenVLA then has no proprio)"}
    missing = []
    for key in spec.proprio_source_keys():
        leaf = leaves.get(f"steps/{key}")
        if leaf is None or leaf.kind != "tensor" or leaf.dtype == "object":
            missing.append(key)
    if missing:
        return {"written": False, "reason": f"state keys not numeric step features of the source: {missing}"}
    columns = []
    for key in spec.state_keys:
        width = 1 if key is None else sum(_part_width(p, leaves) for p in spec.state_parts(key))
        columns.append([key, width])
    return {"written": True, "state_obs_keys": list(spec.state_keys), "state_encoding": spec.state_encoding, "columns": columns,
            "dims": sum(w for _, w in columns), "source_keys": spec.proprio_source_keys()}


def _json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


SAMPLE_BYTES = 64 * 1024  # per shard: head, middle and tail blocks are hashed


def source_digest(ds_dir: Path, shard_paths: Sequence[str]) -> str:
    """What the source *is*: dataset_info.json (split sizes, shard lengths, checksums where tfds recorded them),
    then each shard's name, size and a hash of its first, middle and last 64 KiB.

    A dataset replaced by another with the same shard names and counts changes this, so the "already
    converted" check and resume refuse it instead of keeping old output or mixing episodes of both. Cost:
    three small reads per shard (under a second for the 1,024 shards of a large OXE dataset on local disk),
    not a pass over the data. The directory's path is not part of it: moving the data does not make a
    finished conversion stale.
    """
    h = hashlib.sha256()
    h.update((ds_dir / "dataset_info.json").read_bytes())
    for path in shard_paths:
        size = os.path.getsize(path)
        h.update(f"\0{os.path.basename(path)}\0{size}\0".encode())
        with open(path, "rb") as f:
            for offset in sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}):
                f.seek(offset)
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def _file_digest(path: str | None) -> str | None:
    return None if path is None else hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# One unit (runs in a worker process; no TensorFlow)


def _route(routes: Sequence[tuple[int, int, str]], index: int) -> str | None:
    for lo, hi, dst in routes:
        if lo <= index < hi:
            return dst
    return None


def _select_frames(n: int, k: int | None, seed: int, dataset: str, split: str, episode: int) -> np.ndarray:
    if k is None or n <= k:
        return np.arange(n)
    rng = np.random.default_rng([seed, zlib.crc32(dataset.encode()), zlib.crc32(split.encode()), episode])
    return np.sort(rng.choice(n, size=k, replace=False))


def _bump(d: dict[str, int], key: str, n: int = 1) -> None:
    if n:
        d[key] = d.get(key, 0) + n


# What happens to a stored JPEG that is damaged (truncated, zero-filled, trailing bytes; with --verify-images
# also any that does not decode): the frame is skipped and counted under dropped_frames["corrupt_image"],
# its id and the reason are listed in the manifest (first BAD_FRAMES_LISTED per split), and a warning is
# logged. Failing the whole dataset for one bad frame in millions would cost a conversion run for nothing;
# copying it would hand the trainer a frame it cannot decode.
BAD_FRAMES_LISTED = 100


@dataclass(frozen=True)
class UnitJob:
    """Everything a worker needs to convert one unit (picklable; workers never see the plan)."""

    unit: Unit
    spec_raw: dict[str, Any]
    leaves: dict[str, LeafSpec]
    request: DatasetRequest
    work_dir: str
    images_root: str
    frames_per_episode: int | None
    seed: int
    verify_images: bool = False
    wrist_key: str | None = None  # the wrist camera's step key; None: no wrist view
    wrist_root: str | None = None
    proprio: bool = False  # build OpenVLA's proprio (every state key None: a proprio of zero columns)
    proprio_keys: tuple[str, ...] = ()  # step keys the proprio is built from
    proprio_dims: int = 0  # its width, from the feature shapes (checked on every episode)

    @property
    def done_dir(self) -> Path:
        return Path(self.work_dir) / "units" / self.unit.unit_id

    @property
    def tmp_dir(self) -> Path:
        return Path(self.work_dir) / "units" / f"{self.unit.unit_id}.tmp"


@dataclass
class RawEpisode:
    """One record read from a shard: where it goes and its parsed features."""

    record: int
    index: int  # position in split="all" of its source split (the episode number in ids)
    split: str | None  # our split, or None: read for the statistics only (e.g. the test split)
    episode: Episode


def _new_counts(unit_id: str) -> dict[str, Any]:
    return {
        "unit": unit_id,
        "episodes": 0,
        "num_trajectories": 0,
        "num_transitions": 0,
        "dropped_for_statistics": {},
        "splits": {s: _new_split_counts() for s in ("train", "val")},
    }


def _new_split_counts() -> dict[str, Any]:
    return {"episodes_read": 0, "episodes_kept": 0, "frames": 0, "image_bytes": 0, "images": {},
            "wrist_image_bytes": 0, "wrist_images": {},
            "dropped_episodes": {}, "dropped_frames": {}, "bad_frames": []}


def process_unit(job: UnitJob) -> dict[str, Any]:
    """Convert one shard file of one split; returns its counts (or an error). Safe to re-run."""
    unit = job.unit
    try:
        return _process_unit(job)
    except CorruptRecordError as e:
        return {"unit": unit.unit_id, "error": str(e)}
    except OutputWriteError as e:  # names the output file; the input shard is not at fault
        return {"unit": unit.unit_id, "error": str(e)}
    except Exception as e:  # noqa: BLE001 - reported per dataset, other datasets go on
        return {"unit": unit.unit_id, "error": f"{unit.path}: {type(e).__name__}: {e}"}


def _process_unit(job: UnitJob) -> dict[str, Any]:
    """Read -> (filter) -> standardize -> statistics rows -> select frames -> write; then commit the unit."""
    if (job.done_dir / "counts.json").is_file():  # finished by an earlier (killed) run
        return json.loads((job.done_dir / "counts.json").read_text())
    spec = parse_entry(job.unit.dataset, job.spec_raw)
    shutil.rmtree(job.tmp_dir, ignore_errors=True)
    job.tmp_dir.mkdir(parents=True)
    counts = _new_counts(job.unit.unit_id)
    stat_rows: list[np.ndarray] = []
    proprio_rows: list[np.ndarray] = []
    writer = _FrameWriter(job)
    with atomic_open(job.tmp_dir / "samples.jsonl", "w") as samples:
        for raw in _read_episodes(job, spec):
            counts["episodes"] += 1
            sc = counts["splits"][raw.split] if raw.split else None
            if sc is not None:
                sc["episodes_read"] += 1
            if not _passes_episode_filters(job, spec, raw, counts, sc):
                continue
            action, language = _standardize(spec, raw)
            proprio = build_proprio(spec, raw.episode) if job.proprio else None
            if proprio is not None and proprio.shape[1] != job.proprio_dims:
                raise ValueError(f"record {raw.record}: proprio has {proprio.shape[1]} columns, the features say "
                                 f"{job.proprio_dims}")
            finite = np.isfinite(action).all(axis=1)
            counts["num_trajectories"] += 1
            counts["num_transitions"] += int(finite.sum())
            _bump(counts["dropped_for_statistics"], "nonfinite_action", int((~finite).sum()))
            stat_rows.append(action[finite])
            if proprio is not None:
                proprio_rows.append(proprio[finite])  # the transitions of the action statistics
            if sc is None:
                continue
            chosen = _select_trainable_frames(job, raw, language, finite, sc)
            if chosen is None:
                continue
            written = writer.write_episode(raw, chosen, action, language, sc, samples, proprio)
            if written:
                sc["episodes_kept"] += 1
                sc["frames"] += written
            else:
                _bump(sc["dropped_episodes"], "no_frames")
    _commit_unit(job, counts, stat_rows, writer.sample_actions, writer.episode_actions,
                 proprio_rows if job.proprio else None)
    return counts


def _read_episodes(job: UnitJob, spec: Any) -> Iterator[RawEpisode]:
    """Step 1, read: the unit's records, parsed (images stay encoded; split-less ones without images)."""
    unit = job.unit
    # proprio over split="all" (its statistics), the wrist camera only where frames are written
    keys_stats_only = list(dict.fromkeys(spec.step_keys(with_images=False) + list(job.proprio_keys)))
    keys_with_images = list(dict.fromkeys(spec.step_keys(with_images=True) + list(job.proprio_keys)
                                          + ([job.wrist_key] if job.wrist_key else [])))
    episode_keys = [spec.success_key] if (job.request.filter_success and spec.success_key) else []
    for record, payload in iter_tfrecord(unit.path, unit.skip, unit.take):
        gidx = unit.global_start + (record - unit.skip)
        split = _route(unit.routes, gidx)
        try:
            steps, meta, length = parse_episode(
                payload, job.leaves, keys_with_images if split else keys_stats_only, episode_keys
            )
        except (KeyError, ValueError) as e:
            raise type(e)(f"{unit.path}: record {record}: {e}") from e
        except Exception as e:  # a payload whose CRC matched but is not an Example
            raise CorruptRecordError(unit.path, record, f"cannot parse example: {e}") from e
        yield RawEpisode(record, gidx, split, Episode(steps=steps, step_index=np.arange(length), meta=meta))


def _passes_episode_filters(job: UnitJob, spec: Any, raw: RawEpisode, counts: dict[str, Any],
                            sc: dict[str, Any] | None) -> bool:
    """filter_success: kuka-style success filtering happens at prep time in OpenVLA (the episode does not
    exist, not even for the statistics)."""
    if job.request.filter_success and spec.success_key and not bool(raw.episode.meta.get(spec.success_key, True)):
        _bump(counts["dropped_for_statistics"], "filter_success")
        if sc is not None:
            _bump(sc["dropped_episodes"], "filter_success")
        return False
    return True


def _standardize(spec: Any, raw: RawEpisode) -> tuple[np.ndarray, list[str]]:
    """Step 2, standardize: OpenVLA's per-dataset transform -> (T, 7) actions and per-step instructions."""
    try:
        return standardize(spec, raw.episode)
    except (KeyError, ValueError) as e:
        raise ValueError(f"record {raw.record}: standardization failed: {e}") from e


def _select_trainable_frames(job: UnitJob, raw: RawEpisode, language: Sequence[str], finite: np.ndarray,
                             sc: dict[str, Any]) -> np.ndarray | None:
    """Step 3, select: the episode-level drops (counted), then the finite frames, then --frames-per-episode."""
    if raw.episode.length == 0:
        _bump(sc["dropped_episodes"], "no_frames")
        return None
    if not any(language):  # OpenVLA skip_unlabeled: every instruction of the trajectory is ""
        _bump(sc["dropped_episodes"], "unlabeled")
        return None
    if any(IMAGE_TOKEN in text for text in language):
        # Rejected, not escaped: the trainer strips "<image>" from the human turn, so the model would be
        # trained on another instruction than the data holds. Counted; the manifest warns.
        _bump(sc["dropped_episodes"], "image_token_in_instruction")
        return None
    _bump(sc["dropped_frames"], "nonfinite_action", int((~finite).sum()))
    candidates = np.flatnonzero(finite)
    chosen = candidates[_select_frames(len(candidates), job.frames_per_episode, job.seed, job.unit.dataset,
                                       raw.split, raw.index)]
    _bump(sc["dropped_frames"], "not_selected", len(candidates) - len(chosen))
    return chosen


class _FrameWriter:
    """Step 4, write: each chosen frame's JPEG under images/ (and its wrist JPEG under images_wrist/) and its
    sample line; counts what it skips."""

    def __init__(self, job: UnitJob):
        self.job = job
        self.made_dirs: set[str] = set()
        self.sample_actions: list[np.ndarray] = []
        # each kept episode's full standardized sequence (chunk windows), and its proprio where built
        self.episode_actions: dict[str, np.ndarray] = {}
        self.image_key = f"observation/{parse_entry(job.unit.dataset, job.spec_raw).primary_image}"

    def _jpeg(self, stored: Any, flip: bool) -> tuple[bytes | None, str, str | None]:
        """(bytes, how, None) for a frame to write, else (None, reason, detail): the checks of the primary frame."""
        try:
            data, how = frame_jpeg(stored, flip)
        except MissingImageError:
            return None, "missing_image", None
        except ImageDecodeError:
            return None, "undecodable_image", None
        problem = jpeg_structure_problem(data) if how == "copied" else None
        if problem is None and self.job.verify_images and how == "copied":
            problem = verify_decodes(data)
        if problem is not None:
            return None, "corrupt_image", problem
        return data, how, None

    def _write(self, root: str, raw: RawEpisode, step: int, data: bytes) -> None:
        ep_dir = f"{root}/{raw.split}/{raw.index:06d}"
        if ep_dir not in self.made_dirs:
            try:
                os.makedirs(ep_dir, exist_ok=True)
            except OSError as e:
                raise OutputWriteError(e.errno, f"cannot create {ep_dir}: {e.strerror}") from e
            self.made_dirs.add(ep_dir)
        # no temp-and-rename per image: the whole images/ tree lives in the unfinished dataset directory
        # until finalize renames it, and a re-run unit rewrites (truncates) every file it owns
        write_file(f"{ep_dir}/{step:04d}.jpg", data)

    def _bad_frame(self, sc: dict[str, Any], raw: RawEpisode, step: int, problem: str, view: str = "") -> None:
        if len(sc["bad_frames"]) < BAD_FRAMES_LISTED:
            sc["bad_frames"].append(f"{view}{raw.split}/{raw.index:06d}/{step:04d} ({self.job.unit.path} "
                                    f"record {raw.record}): {problem}")

    def write_episode(self, raw: RawEpisode, chosen: np.ndarray, action: np.ndarray, language: Sequence[str],
                      sc: dict[str, Any], samples: Any, proprio: np.ndarray | None = None) -> int:
        ep = raw.episode
        images = ep.steps[self.image_key]
        wrist = ep.steps[self.job.wrist_key] if self.job.wrist_key else None
        written = 0
        for t in chosen.tolist():
            step = int(ep.step_index[t])
            data, how, problem = self._jpeg(images[t], self.job.request.flip_image_channels)
            if data is None:
                _bump(sc["dropped_frames"], how)
                if problem is not None:
                    self._bad_frame(sc, raw, step, problem)
                continue
            self._write(self.job.images_root, raw, step, data)
            _bump(sc["images"], how)
            sc["image_bytes"] += len(data)
            # the wrist view: a frame whose wrist image is empty or damaged keeps its primary frame and gets
            # OpenVLA's padding (a zero image, no file); "no_camera": the dataset has no wrist view
            wrist_status = "no_camera"
            if wrist is not None:
                wdata, wstatus, wproblem = self._jpeg(wrist[t], self.job.request.flip_wrist_image_channels)
                if wdata is None:
                    wrist_status = wstatus
                    if wproblem is not None:
                        self._bad_frame(sc, raw, step, wproblem, view="wrist ")
                else:
                    self._write(self.job.wrist_root, raw, step, wdata)
                    wrist_status = "written"
                    _bump(sc["wrist_images"], wstatus)
                    sc["wrist_image_bytes"] += len(wdata)
            samples.write(json.dumps([raw.split, raw.index, step, language[t], wrist_status], ensure_ascii=False) + "\n")
            self.sample_actions.append(action[t])
            written += 1
        if written:
            self.episode_actions[f"{raw.split}/{raw.index}/action"] = action
            self.episode_actions[f"{raw.split}/{raw.index}/step"] = ep.step_index
            if proprio is not None:
                self.episode_actions[f"{raw.split}/{raw.index}/proprio"] = proprio
        return written


def _commit_unit(job: UnitJob, counts: dict[str, Any], stat_rows: list[np.ndarray],
                 sample_actions: list[np.ndarray], episode_actions: Mapping[str, np.ndarray],
                 proprio_rows: list[np.ndarray] | None = None) -> None:
    """The unit's statistics rows (actions, and proprio where built), sample actions and counts, then one
    rename: it exists only once complete."""
    tmp = job.tmp_dir
    rows = np.concatenate(stat_rows) if stat_rows else np.zeros((0, 7), np.float32)
    try:
        np.save(tmp / "actions.npy", rows.astype(np.float32))
        if proprio_rows is not None:
            prop = np.concatenate(proprio_rows) if proprio_rows else np.zeros((0, 0), np.float32)
            np.save(tmp / "proprio.npy", prop.astype(np.float32))
        np.save(tmp / "sample_actions.npy", np.asarray(sample_actions, np.float32).reshape(-1, 7))
        np.savez(tmp / "episode_actions.npz", **episode_actions)
    except OSError as e:
        raise OutputWriteError(e.errno, f"cannot write {tmp}: {e.strerror}") from e
    write_text(tmp / "counts.json", json.dumps(counts, sort_keys=True))
    shutil.rmtree(job.done_dir, ignore_errors=True)
    os.replace(tmp, job.done_dir)


# ----------------------------------------------------------------------------------------------
# Finishing a dataset (main process)


def _merge_counts(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"num_trajectories": 0, "num_transitions": 0, "dropped_for_statistics": {}, "splits": {}}
    for c in parts:
        total["num_trajectories"] += c["num_trajectories"]
        total["num_transitions"] += c["num_transitions"]
        for k, v in c["dropped_for_statistics"].items():
            _bump(total["dropped_for_statistics"], k, v)
        for s, sc in c["splits"].items():
            t = total["splits"].setdefault(s, _new_split_counts())
            for key in ("episodes_read", "episodes_kept", "frames", "image_bytes", "wrist_image_bytes"):
                t[key] += sc.get(key, 0)
            t["bad_frames"] = (t["bad_frames"] + sc.get("bad_frames", []))[:BAD_FRAMES_LISTED]
            for key in ("images", "wrist_images", "dropped_episodes", "dropped_frames"):
                for k, v in sc.get(key, {}).items():
                    _bump(t[key], k, v)
    return total


def _write_json_atomic(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _write_episode_actions(work: Path, units: Sequence[Unit], final: Path, stats: Mapping[str, Any],
                           proprio_dims: int | None = None) -> None:
    """<split>_actions.npz: every kept episode's full normalized action sequence, from which training builds
    H-step windows (llava_vla_plugin/core/chunk_data.py), so H needs no re-conversion. The gripper is absolute
    (EEF_POS, the only encoding converted), the rest relative, as OpenVLA's absolute_action_mask.
    <split>_proprio.npz (when `proprio_dims` is given): the same episodes' raw proprio, row for row (same steps),
    in the same EpisodeActions layout as byod.py writes it (absolute_mask: every dimension, a state is absolute)."""
    for split in ("train", "val"):
        episodes, proprio = {}, {}
        for u in units:
            path = work / "units" / u.unit_id / "episode_actions.npz"
            if not path.exists():
                continue
            with np.load(path) as z:
                for key in z.files:
                    s, gidx, kind = key.split("/")
                    if s == split and kind == "action":
                        steps = z[f"{s}/{gidx}/step"]
                        episodes[int(gidx)] = (normalize_bounds_q99(z[key], stats), steps)
                        if proprio_dims is not None:
                            proprio[int(gidx)] = (z[f"{s}/{gidx}/proprio"], steps)
        EpisodeActions.from_episodes(episodes, EEF_POS_ABSOLUTE_MASK).save(final / episode_actions_file(split))
        if proprio_dims is not None:
            EpisodeActions.from_episodes(proprio, (True,) * proprio_dims).save(final / episode_proprio_file(split))


def finalize_dataset(plan: DatasetPlan, out_dir: Path, opts: RunOptions, unit_counts: Mapping[str, Any]) -> dict[str, Any]:
    name = plan.request.name
    spec = parse_entry(name, plan.spec_raw)
    work = out_dir / WORK_DIR / name
    final = work / "final"
    units = plan.units  # split order of dataset_info, shard order: OpenVLA's split="all" file order
    proprio_dims = plan.proprio["dims"] if plan.proprio.get("written") else None
    proprio_rows = None
    if proprio_dims is not None:
        proprio_rows = np.concatenate([np.load(work / "units" / u.unit_id / "proprio.npy").reshape(-1, proprio_dims)
                                       for u in units])
    if opts.stats_from:
        stats = with_mask(load_published_statistics(opts.stats_from, name), spec.action_normalization_mask)
        stats_source = f"--stats-from {opts.stats_from}"
        if proprio_rows is not None and len(proprio_rows):
            # the published file's proprio is OpenVLA's over zeros (load_proprio=False); the converted proprio's
            # own statistics replace it, over the same transitions as a computed action entry would be
            stats["proprio"] = proprio_statistics(proprio_rows, proprio_rows[:, :0])
            stats_source += '; proprio computed over split="all"'
    else:
        rows = np.concatenate([np.load(work / "units" / u.unit_id / "actions.npy") for u in units])
        num_traj = sum(unit_counts[u.unit_id]["num_trajectories"] for u in units)
        stats = compute_statistics(rows, num_traj, spec.action_normalization_mask, proprio=proprio_rows)
        stats_source = 'computed over split="all" (OpenVLA get_dataset_statistics)'
    if proprio_rows is not None and stats["proprio"].get("source") == PROPRIO_SOURCE_STATE:
        stats["proprio"][PROPRIO_PADDING] = padding_columns(plan.proprio["columns"])
    counts = _merge_counts([unit_counts[u.unit_id] for u in units])
    views = {s: {"written": 0, "no_camera": 0, "missing_image": 0, "undecodable_image": 0, "corrupt_image": 0}
             for s in ("train", "val")}
    zero_filters = [f.params for f in spec.frame_filters if f.name == "zero_action"]
    with atomic_open(final / split_file("train"), "w") as train, atomic_open(final / split_file("val"), "w") as val:
        outputs = {"train": train, "val": val}
        for u in units:
            unit_dir = work / "units" / u.unit_id
            lines = (unit_dir / "samples.jsonl").read_text().splitlines()
            if not lines:
                continue
            raw = np.load(unit_dir / "sample_actions.npy")
            norm = normalize_bounds_q99(raw, stats)
            keep = np.ones(len(lines), bool)
            for params in zero_filters:
                keep &= zero_action_keep_mask(norm, params["q01"], params["q99"])
            for line, a_raw, a, ok in zip(lines, raw, norm, keep):
                split, episode, step, instruction, wrist = json.loads(line)
                rel = image_relpath(split, episode, step)
                if not ok:
                    _bump(counts["splits"][split]["dropped_frames"], "zero_action")
                    counts["splits"][split]["frames"] -= 1
                    # missing_ok: an earlier finalize of this dataset that failed later on already removed it
                    (final / "images" / rel).unlink(missing_ok=True)
                    (final / WRIST_IMAGES_DIR / rel).unlink(missing_ok=True)
                    continue
                views[split][wrist] += 1
                wrist_path = wrist_image_path(name, split, episode, step) if wrist == "written" else None
                outputs[split].write(ConvertedSample(name, split, episode, step, instruction, a, a_raw,
                                                     wrist_path).to_json_line())
    _write_episode_actions(work, units, final, stats, proprio_dims)
    (final / "images").mkdir(exist_ok=True)
    if plan.wrist_key:
        (final / WRIST_IMAGES_DIR).mkdir(exist_ok=True)
    warnings = []
    if plan.views_note:
        warnings.append(plan.views_note)
    if plan.request.flip_wrist_image_channels and not plan.wrist_key:
        warnings.append("flip_wrist_image_channels has no effect: the dataset has no wrist camera")
    for s in ("train", "val"):
        sc = counts["splits"].get(s, {})
        if sc.get("frames", 0) == 0:
            warnings.append(f"{s} split is empty")
        bad = sc.get("dropped_frames", {}).get("corrupt_image", 0)
        if bad:
            warnings.append(f"{s}: {bad} frames skipped for a damaged JPEG (listed in counts.splits.{s}.bad_frames)")
        rejected = sc.get("dropped_episodes", {}).get("image_token_in_instruction", 0)
        if rejected:
            warnings.append(f"{s}: {rejected} episodes skipped: their instruction contains {IMAGE_TOKEN!r}, "
                            "which the trainer would strip")
    for w in warnings:
        log.warning("%s: %s", name, w)
    _write_json_atomic(final / STATISTICS_FILE, {name: stats})
    manifest = {
        "tool_version": TOOL_VERSION,
        "dataset": name,
        "source": {"data_dir": plan.dataset_dir, "tfds_name": plan.tfds_name, "tfds_version": plan.tfds_version},
        "shards": plan.shards,
        "splits": plan.split_sources,
        "split_episodes": plan.split_sizes,
        "options": {
            **{k: v for k, v in asdict(plan.request).items() if k not in ("name", "version")},
            "frames_per_episode": opts.frames_per_episode,
            "seed": opts.seed,
        },
        "statistics": stats_source,
        "views": _views_manifest(plan, spec, views),
        "proprio": {**plan.proprio, "file": episode_proprio_file("<split>") if plan.proprio.get("written") else None,
                    "statistics_source": stats["proprio"].get("source")},
        "registry_entry": plan.spec_raw,
        "counts": counts,
        "warnings": warnings,
        "fingerprint": plan.fingerprint,
        "fingerprint_parts": plan.fingerprint_parts(),
    }
    _write_json_atomic(final / MANIFEST_FILE, manifest)
    target = out_dir / name
    os.replace(final, target)  # the whole dataset appears at once
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def _views_manifest(plan: DatasetPlan, spec: Any, views: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
    """Frames per camera view of the written samples; a wrist frame that is not written is OpenVLA's padding."""
    def per(split_counts: Mapping[str, int]) -> dict[str, Any]:
        frames = sum(split_counts.values())
        missing = {k: v for k, v in split_counts.items() if k != "written" and v}
        return {"frames": split_counts["written"], "missing": frames - split_counts["written"], "missing_why": missing}

    wrist = {"key": plan.wrist_key.split("/", 1)[1] if plan.wrist_key else None,
             "dir": WRIST_IMAGES_DIR if plan.wrist_key else None,
             **per({k: sum(v[k] for v in views.values()) for k in views["train"]}),
             "splits": {s: per(v) for s, v in views.items()}, "rule": WRIST_MISSING_RULE}
    return {"primary": {"key": spec.primary_image, "dir": "images",
                        "frames": sum(sum(v.values()) for v in views.values()),
                        "splits": {s: {"frames": sum(v.values())} for s, v in views.items()}},
            "wrist": wrist}


# ----------------------------------------------------------------------------------------------
# Orchestration


def _recorded(path: Path) -> dict[str, Any]:
    """The fingerprint a finished dataset's manifest.json or a partial run's plan.json recorded ({} if none)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _recorded_inputs(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """The inputs a plan.json (`inputs`) or a manifest.json (its own fields) recorded, in plan.inputs' terms."""
    if isinstance(recorded.get("inputs"), dict):
        return recorded["inputs"]
    if "tool_version" not in recorded:
        return {}
    statistics = str(recorded.get("statistics") or "")
    return {
        "tool_version": recorded.get("tool_version"),
        "tfds_version": (recorded.get("source") or {}).get("tfds_version"),
        "options": {k: v for k, v in (recorded.get("options") or {}).items() if k != "weight"},
        "registry_entry": recorded.get("registry_entry"),
        "shards": recorded.get("shards"),
        "stats_from": statistics[len("--stats-from "):] if statistics.startswith("--stats-from ") else None,
    }


def _changed_inputs(recorded: Mapping[str, Any], plan: DatasetPlan) -> list[str]:
    """The recorded inputs that differ from this plan's, each as `what: recorded -> now`."""
    old = _recorded_inputs(recorded)
    if not old:
        return []
    new, changed = plan.inputs, []
    if old.get("tool_version") != new["tool_version"]:
        changed.append(f"converter version: {old.get('tool_version')} -> {new['tool_version']}")
    if old.get("tfds_version") != new["tfds_version"]:
        changed.append(f"dataset version: {old.get('tfds_version')} -> {new['tfds_version']}")
    old_opts = old.get("options") or {}
    for key, value in new["options"].items():
        if old_opts.get(key) != value:
            flag = {"frames_per_episode": "--frames-per-episode", "seed": "--seed"}.get(key, f"mixture option {key}")
            changed.append(f"{flag}: {old_opts.get(key)} -> {value}")
    if old.get("registry_entry") != new["registry_entry"]:
        old_entry, new_entry = old.get("registry_entry") or {}, new["registry_entry"] or {}
        keys = sorted(k for k in set(old_entry) | set(new_entry) if old_entry.get(k) != new_entry.get(k))
        changed.append(f"the registry entry of {plan.request.name} (keys: {', '.join(keys)})")
    if old.get("shards") != new["shards"]:
        changed.append(f"the shard files in {plan.dataset_dir}")
    if old.get("stats_from") != new["stats_from"]:
        changed.append(f"--stats-from: {old.get('stats_from')} -> {new['stats_from']}")
    return changed


def _what_changed(recorded: Mapping[str, Any], plan: DatasetPlan) -> str | None:
    """None if `recorded` is this plan's conversion, else what differs, in words (a phrase that follows "from")."""
    if recorded.get("fingerprint") == plan.fingerprint:
        return None
    parts = recorded.get("fingerprint_parts") or {}
    source_same = parts.get("source") == plan.source_digest
    if source_same and parts.get("options") in plan.equivalent_options_digests:
        return None  # the same version, named explicitly once and left implicit the other time
    what = []
    if parts and not source_same:
        what.append(f"other source data in {plan.dataset_dir} (its files' content differs)")
    if not parts or parts.get("options") not in plan.equivalent_options_digests:
        changed = _changed_inputs(recorded, plan)
        what.append("other options (" + "; ".join(changed) + ")" if changed else
                    "other conversion options or another registry entry (not recorded in detail by the earlier run)")
    return " and ".join(what)


def _write_top_level(out_dir: Path, requests: Sequence[DatasetRequest], weighting: str = DEFAULT_WEIGHTING,
                     alpha: float | None = None) -> None:
    """OUT/dataset_statistics.json and OUT/mixture.yaml. The mixture's multipliers come from the one share rule
    (training_mixture.mixture_shares) at fraction 1: by default OpenVLA's w x num_transitions, which the kept
    frames alone cannot give once --frames-per-episode subsamples. `kept_frames` writes the spec's weights as
    the multipliers themselves (the file convert wrote before the rule was recorded), plus the record."""
    from data_tools.training_mixture import plan_mixture, write_training_mixture

    combined = {}
    for req in requests:
        combined.update(json.loads((out_dir / req.name / STATISTICS_FILE).read_text()))
    _write_json_atomic(out_dir / STATISTICS_FILE, combined)
    if weighting != "kept_frames":
        plan = plan_mixture(out_dir, {r.name: r.weight for r in requests}, 1.0, weighting=weighting, alpha=alpha,
                            weights_source="convert --mixture/--datasets")
        write_training_mixture(plan, out_dir / MIXTURE_FILE, made_by="`python -m data_tools.convert`")
        return
    entries = [{"json_path": str((out_dir / req.name / TRAIN_FILE).resolve()), "sampling_strategy": "all",
                "weight": req.weight} for req in requests]
    text = "# LLaVA-NeXT --data_path file; images are relative to --image_folder " + str(out_dir.resolve()) + "\n"
    text += yaml.safe_dump({"datasets": entries, "vla_mixture": {"weighting": "kept_frames", "fraction": None}},
                           sort_keys=False)
    write_text(out_dir / MIXTURE_FILE, text)


def convert(
    data_dir: Path,
    requests: Sequence[DatasetRequest],
    out_dir: Path,
    registry: Registry,
    opts: RunOptions,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    weighting: str = DEFAULT_WEIGHTING,
    alpha: float | None = None,
) -> dict[str, str]:
    """Convert every requested dataset; returns {dataset: error} for the ones that failed. `weighting`/`alpha`:
    the share rule of OUT/mixture.yaml (data_tools/training_mixture.py)."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    failures: dict[str, str] = {}
    plans: list[DatasetPlan] = []
    for req in requests:
        try:
            plan = plan_dataset(data_dir, req, registry, opts)
        except (UnknownDatasetError, RegistryError, FileNotFoundError, ValueError, KeyError) as e:
            failures[req.name] = str(e)
            log.error("%s: %s", req.name, e)
            continue
        target, work = out_dir / req.name, out_dir / WORK_DIR / req.name
        if overwrite:
            shutil.rmtree(target, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
        elif target.exists():
            changed = _what_changed(_recorded(target / MANIFEST_FILE), plan)
            if changed is None:
                log.info("%s: already converted in %s (same source content and options), skipping", req.name, target)
                shutil.rmtree(work, ignore_errors=True)  # left over if a run died right after finishing it
                continue
            failures[req.name] = (f"{target} was converted from {changed} than this run's. Run with the options "
                                  f"it was converted with to reuse it, --out elsewhere to keep both, or --overwrite "
                                  f"to convert it again")
            log.error("%s: %s", req.name, failures[req.name])
            continue
        plan_file = work / "plan.json"
        changed = _what_changed(_recorded(plan_file), plan) if plan_file.is_file() else None
        if changed is not None:
            failures[req.name] = (f"{work} holds a partial run made from {changed} than this run's (resuming would "
                                  "mix the two). Rerun with its options to resume it, or pass --overwrite to start again")
            log.error("%s: %s", req.name, failures[req.name])
            continue
        (work / "final" / "images").mkdir(parents=True, exist_ok=True)
        (work / "units").mkdir(parents=True, exist_ok=True)
        for stale in (work / "units").glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)  # a killed run's unfinished unit is redone from scratch
        _write_json_atomic(plan_file, {"fingerprint": plan.fingerprint, "fingerprint_parts": plan.fingerprint_parts(),
                                       "inputs": plan.inputs})
        log.info("%s: %s (%s %s), %d shard files", req.name, plan.dataset_dir, plan.tfds_name, plan.tfds_version,
                 len(plan.units))
        plans.append(plan)

    jobs = []
    for plan in plans:
        work = out_dir / WORK_DIR / plan.request.name
        for unit in plan.units:
            jobs.append(
                UnitJob(
                    unit=unit,
                    spec_raw=plan.spec_raw,
                    leaves=plan.leaves,
                    request=plan.request,
                    work_dir=str(work),
                    images_root=str(work / "final" / "images"),
                    frames_per_episode=opts.frames_per_episode,
                    seed=opts.seed,
                    verify_images=opts.verify_images,
                    wrist_key=plan.wrist_key,
                    wrist_root=str(work / "final" / WRIST_IMAGES_DIR) if plan.wrist_key else None,
                    proprio=bool(plan.proprio.get("written")),
                    proprio_keys=tuple(plan.proprio.get("source_keys", ())),
                    proprio_dims=int(plan.proprio.get("dims", 0)),
                )
            )
    by_name = {p.request.name: p for p in plans}
    pending = {p.request.name: {u.unit_id for u in p.units} for p in plans}
    results: dict[str, dict[str, Any]] = {p.request.name: {} for p in plans}
    bars = {
        p.request.name: tqdm(total=sum(u.take for u in p.units), desc=p.request.name, unit="ep", disable=not progress,
                             leave=True, dynamic_ncols=True)
        for p in plans
    }
    frames = {name: 0 for name in by_name}
    mbytes = {name: 0.0 for name in by_name}

    def on_result(job: UnitJob, res: Mapping[str, Any]) -> None:
        name = job.unit.dataset
        bar = bars[name]
        if "error" in res:
            failures.setdefault(name, res["error"])
            log.error("%s: %s", name, res["error"])
        else:
            log.debug("%s: read %s: %d episodes", name, job.unit.path, res["episodes"])
            results[name][res["unit"]] = res
            frames[name] += sum(s["frames"] for s in res["splits"].values())
            mbytes[name] += sum(s["image_bytes"] for s in res["splits"].values()) / 1e6
            bar.update(res["episodes"])
            bar.set_postfix(frames=frames[name], MB=f"{mbytes[name]:.1f}")
        pending[name].discard(job.unit.unit_id)
        if not pending[name] and name not in failures:
            try:
                m = finalize_dataset(by_name[name], out_dir, opts, results[name])
                log.info("%s: wrote %s (train %d, val %d frames)", name, out_dir / name,
                         m["counts"]["splits"].get("train", {}).get("frames", 0),
                         m["counts"]["splits"].get("val", {}).get("frames", 0))
            except Exception as e:  # noqa: BLE001
                failures[name] = f"finalizing failed: {type(e).__name__}: {e}"
                log.error("%s: %s", name, failures[name])
            bar.close()

    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            on_result(job, process_unit(job))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        # spawn: the parent has TensorFlow loaded (tfds planning); forking it is unsafe. An executor (not a
        # Pool) so that a worker killed by the OS surfaces as an error instead of a hang.
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(process_unit, job) for job in jobs]
            for job, fut in zip(jobs, futures):
                try:
                    res = fut.result()
                except BrokenProcessPool as e:
                    res = {"unit": job.unit.unit_id, "error": f"worker process died: {e}"}
                on_result(job, res)
    for bar in bars.values():
        bar.close()

    if failures:
        log.error("not written: %s and %s (failed: %s)", MIXTURE_FILE, STATISTICS_FILE, ", ".join(sorted(failures)))
    else:
        try:
            _write_top_level(out_dir, requests, weighting, alpha)
        except MixtureToolError as e:  # e.g. no dataset has a train frame: nothing to train on, said by name
            log.error("not written: %s (%s)", out_dir / MIXTURE_FILE, e)
            failures[MIXTURE_FILE] = f"{out_dir / MIXTURE_FILE}: {e}"
            return failures
        log.info("wrote %s and %s", out_dir / MIXTURE_FILE, out_dir / STATISTICS_FILE)
        try:
            (out_dir / WORK_DIR).rmdir()
        except OSError:
            pass
    return failures


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_tools.convert",
        description="Convert OXE RLDS datasets to LLaVA JSON exactly as OpenVLA's pipeline sees them "
        "(standardization, statistics, BOUNDS_Q99 normalization, splits); images at native resolution.",
        epilog="Exit codes: 0 all converted, 1 some dataset failed (others are still written), 2 usage error "
        "(including an --out that cannot be created or written).",
    )
    p.add_argument("--data-dir", required=True, type=Path, help="directory holding <dataset>/<version>/ TFDS dirs")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--mixture", help="mixture YAML or shipped mixture name (datasets: [{name, version, weight, "
                     "filter_success, flip_image_channels, ...}])")
    src.add_argument("--datasets", help="comma-separated dataset names (weight 1 each)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--workers", type=int, default=1, help="parallel processes over shard files (default 1)")
    p.add_argument("--frames-per-episode", type=int, default=None, metavar="K",
                   help="a seeded choice of K frames per episode (default: all frames)")
    p.add_argument("--seed", type=int, default=0, help="seed for --frames-per-episode (default 0)")
    p.add_argument("--stats-from", type=Path, default=None,
                   help="use published statistics (OpenVLA dataset_statistics.json / norm_stats) instead of computing")
    p.add_argument("--verify-images", action="store_true",
                   help="also decode every copied JPEG in full (slow); damaged frames are skipped and counted in "
                   "manifest.json either way (the cheap structure check always runs)")
    p.add_argument("--overwrite", action="store_true", help="discard earlier output / partial runs of these datasets")
    p.add_argument("--registry", action="append", default=[], type=Path,
                   help="extra registry YAML with custom datasets (repeatable)")
    add_weighting_flags(p)  # OUT/mixture.yaml's share rule
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _unwritable(out: Path) -> str | None:
    """Why files cannot be written under `out` (None if they can): checked before any work starts."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create the directory: {e.strerror or e}"
    if not out.is_dir():
        return "exists and is not a directory"
    if not os.access(out, os.W_OK | os.X_OK):
        return "the directory is not writable"
    return None


def _data_dir_problem(data_dir: Path) -> str | None:
    """Why --data-dir cannot hold any dataset (None if it may): checked before anything loads."""
    if not data_dir.exists():
        return "no such folder"
    if not data_dir.is_dir():
        return "not a folder"
    if not any(p.is_dir() and not p.name.startswith(".") for p in data_dir.iterdir()):
        return "the folder holds no dataset folders (<dataset>/<version>/dataset_info.json)"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    problem = _data_dir_problem(args.data_dir)
    if problem:
        source = f"--mixture {args.mixture}" if args.mixture else "--mixture <name or file listing them>"
        print(f"error: --data-dir {args.data_dir}: {problem}. Download the datasets first: python -m data_tools.download "
              f"{source} --out {args.data_dir} (or pass the folder that holds them)", file=sys.stderr)
        return 2
    try:
        registry = Registry.load(args.registry)
        if args.mixture:
            requests = requests_from_mixture(args.mixture)
        else:
            requests = [DatasetRequest(n.strip()) for n in args.datasets.split(",") if n.strip()]
        unknown = [r.name for r in requests if r.name not in registry]
        if unknown:
            for n in unknown:
                try:
                    registry.get(n)
                except UnknownDatasetError as e:
                    print(f"error: {e}", file=sys.stderr)
            return 2
        if args.frames_per_episode is not None and args.frames_per_episode < 1:
            raise ValueError("--frames-per-episode must be >= 1")
        if args.stats_from is not None and not args.stats_from.is_file():
            raise ValueError(f"--stats-from {args.stats_from}: no such file")
        if args.balance and args.weighting not in (None, "balanced"):
            raise ValueError(f"--balance contradicts --weighting {args.weighting}")
        weighting = args.weighting or DEFAULT_WEIGHTING
        alpha = check_weighting(weighting, args.alpha)
    except (RegistryError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = _unwritable(args.out)
    if problem:
        print(f"error: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    opts = RunOptions(args.frames_per_episode, args.seed, str(args.stats_from) if args.stats_from else None,
                      verify_images=args.verify_images)
    started = time.time()
    try:
        failures = convert(args.data_dir, requests, args.out, registry, opts, args.workers, args.overwrite,
                           progress=not args.no_progress, weighting=weighting, alpha=alpha)
    except OSError as e:  # writing the work directory or the top-level files; names the output path
        print(f"error: writing under --out {args.out} failed: {e}", file=sys.stderr)
        return 1
    log.info("done in %.1fs: %d converted, %d failed", time.time() - started, len(requests) - len(failures), len(failures))
    for name, err in failures.items():
        print(f"FAILED {name}: {err}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
