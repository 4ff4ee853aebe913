"""Download a seeded, resumable fraction of each dataset of a mixture.

    python -m data_tools.download --mixture default --out data/ [--seed 0] [--dry-run] [--workers 8]
    python -m data_tools.download --mixture default --out data/ --source-root /mnt/oxe_copy   # offline

Sources: each dataset's folder comes from the mixture (gs://gresearch/robotics/<name>/<version> by
default). `--source-root ROOT` (or the environment variable VLA_SOURCE_ROOT) replaces the mixture's
`source_root` and the shipped defaults: every dataset without an explicit `source:` is read from
ROOT/<name>/<version> (a local folder, file://, gs:// or https:// laid out like the OXE bucket).

Errors: a source that cannot work now (unknown host, no route, refused, 401/403/404) fails its dataset
at once with a message that says so; only transient errors (timeouts, resets, 408/429/5xx) are retried
(--retries, exponential backoff). Each host is probed once (DNS + TCP connect within --timeout), so an
offline machine learns "no network" in seconds, not after gcsfs' six retries per dataset.

Per dataset (DEST/<name>/<version>/):
  - keeps round(n * fraction) train shards (at least one) picked by an RNG seeded with (seed, dataset,
    split); the choice for a larger fraction contains the choice for a smaller one with the same seed;
  - other splits (val/test): none, the same fraction, or all of them (--other-splits);
  - fetches in parallel with retries into temp files, checks sizes, then renames; a rerun skips every
    file that the manifest records as complete;
  - renumbers the kept shards (tfds needs `-0000i-of-0000k` names) and rewrites dataset_info.json
    (shardLengths, numBytes, dropped splits) so tfds reads exactly the subset; the original is kept
    as dataset_info.orig.json;
  - writes download_manifest.json: source, seed, fraction, shards with original index, size, sha256,
    episode counts.
Exit status: 0 all datasets complete, 1 some dataset failed (others still finished), 2 bad input.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import errno
import hashlib
import json
import logging
import os
import random
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from data_tools.cli import add_common_flags, add_output, setup_logging
from data_tools import atomic
from data_tools.download_spec import DatasetEntry, MixtureError, load_mixture

__all__ = ["choose_shards", "plan_dataset", "download_dataset", "rewrite_dataset_info", "main"]

log = logging.getLogger("data_tools.download")

TOOL_VERSION = "0.1.0"
MANIFEST = "download_manifest.json"
ORIG_INFO = "dataset_info.orig.json"
DEFAULT_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
TFRECORD_OVERHEAD = 16  # bytes of framing per record (length, 2 CRCs); tfds' numBytes excludes it
CHUNK = 8 << 20
OTHER_SPLITS = ("none", "fraction", "all")
SOURCE_ROOT_ENV = "VLA_SOURCE_ROOT"  # the environment spelling of --source-root
DEFAULT_TIMEOUT = 30.0  # seconds: DNS + connect, and the longest silence of a read


class DatasetError(RuntimeError):
    """A dataset that cannot be planned or fetched; the others go on."""


class DiskFullError(OSError):
    """The destination ran out of space; nothing more can be written anywhere."""


# ----------------------------------------------------------------------------------------------
# Sources


class SourceUnreachable(DatasetError):
    """A source that retrying will not fix (no DNS, no route, refused, denied, missing)."""


def open_source(url: str, timeout: float | None = DEFAULT_TIMEOUT) -> tuple[Any, str]:
    """(fsspec filesystem, root path) for a dataset folder: gs:// (anonymous), hf://datasets/..., http(s)://,
    file:// or a path.

    `timeout` bounds connecting and each read's silence (not a whole file's transfer time)."""
    import fsspec

    client_timeout = None
    if timeout is not None and url.startswith(("gs://", "http://", "https://")):
        import aiohttp

        client_timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
    if url.startswith("gs://"):
        # the plain filesystem: gcsfs' default "extended" one first probes the bucket type through
        # the storage-control API, which a public, anonymous read does not need
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem(token="anon", requests_timeout=client_timeout), url[len("gs://"):].rstrip("/")
    if url.startswith(HF_PREFIX):
        return hf_filesystem(), url[len(HF_PREFIX):].rstrip("/")
    if url.startswith(("http://", "https://")):
        # directory listings resolve relative links only against a URL ending in "/"
        kwargs = {"client_kwargs": {"timeout": client_timeout}} if client_timeout else {}
        return fsspec.filesystem("https", **kwargs), url.rstrip("/") + "/"
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/")


HF_PREFIX = "hf://"  # hf://datasets/<owner>/<repo>/<dataset>/<version>: a Hugging Face dataset repository's folder


def hf_filesystem():
    """huggingface_hub's fsspec filesystem (anonymous unless the user is logged in; HF_ENDPOINT for a mirror).

    Why: Hugging Face datasets (OpenVLA's modified LIBERO RLDS) have no plain directory listing over
    HTTPS; the Hub API lists a repository folder with file sizes, which is what planning needs.
    Timeouts are huggingface_hub's own (HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT)."""
    try:
        from huggingface_hub import HfFileSystem
    except ImportError as err:  # a dependency of transformers, so present after `make setup`
        raise DatasetError("hf:// sources need the huggingface_hub package (pip install huggingface-hub)") from err
    return HfFileSystem()


def _endpoint(url: str) -> tuple[str, int] | None:
    """(host, port) a remote source connects to; None for local paths."""
    if url.startswith("gs://"):
        return "storage.googleapis.com", 443
    if url.startswith(HF_PREFIX):
        parts = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
        return parts.hostname or "", parts.port or 443
    if url.startswith(("http://", "https://")):
        parts = urlsplit(url)
        return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    return None


_probe_lock = threading.Lock()
_probe_cache: dict[tuple[str, int], str | None] = {}


def probe_source(url: str, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Resolve and connect to a remote source's host once per run; raise SourceUnreachable if that fails.

    Why: gcsfs retries a failed DNS lookup six times with backoff (~33 s per dataset), so without
    this an offline dry run of the default mixture took ~14 minutes to say "no network"."""
    endpoint = _endpoint(url)
    if endpoint is None:
        return
    with _probe_lock:
        first = endpoint not in _probe_cache
        if first:
            _probe_cache[endpoint] = _try_connect(*endpoint, timeout)
        problem = _probe_cache[endpoint]
    if problem:  # the full explanation once; later datasets on the same host point back to it
        raise SourceUnreachable(f"cannot reach {url}: " + (problem if first else f"{endpoint[0]} unreachable (see above)"))


def _try_connect(host: str, port: int, timeout: float) -> str | None:
    """None if a TCP connection to host:port opens within `timeout` seconds, else what went wrong."""
    hint = (f"no network or no DNS? To work offline, point --source-root (or {SOURCE_ROOT_ENV}) "
            "at a local copy laid out like the bucket (ROOT/<dataset>/<version>/)")
    pool = cf.ThreadPoolExecutor(1)  # getaddrinfo has no timeout of its own
    try:
        addresses = pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM).result(timeout=timeout)
    except cf.TimeoutError:
        return f"DNS lookup of {host} took more than {timeout:g} s; {hint}"
    except socket.gaierror as err:
        return f"cannot resolve host {host} ({err.strerror or err}); {hint}"
    finally:
        pool.shutdown(wait=False)
    last: OSError | None = None
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(timeout)
                sock.connect(address)
                return None
        except OSError as err:
            last = err
    if isinstance(last, (TimeoutError, socket.timeout)):
        return f"connecting to {host}:{port} took more than {timeout:g} s (--timeout); {hint}"
    return f"cannot connect to {host}:{port} ({last}); {hint}"


_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_FATAL_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.ENOENT, errno.EACCES, errno.EPERM}


def is_transient(err: BaseException) -> bool:
    """Whether retrying `err` can help: timeouts, resets and 408/429/5xx yes; DNS failures, no route,
    refused connections, 401/403/404 and missing files no (looks through chained causes)."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (socket.gaierror, SourceUnreachable, FileNotFoundError, PermissionError)):
            return False
        if type(cur).__name__ == "ClientConnectorDNSError":
            return False
        status = getattr(cur, "status", None) or getattr(cur, "code", None)
        if isinstance(status, int) and 400 <= status < 600:
            return status in _TRANSIENT_STATUS
        if isinstance(cur, OSError) and cur.errno in _FATAL_ERRNOS:
            return False
        cur = cur.__cause__ or cur.__context__
    return isinstance(err, (OSError, TimeoutError, ConnectionError)) or "Timeout" in type(err).__name__ \
        or type(err).__module__.startswith("aiohttp")


def _join(root: str, name: str) -> str:
    return root + name if root.endswith("/") else f"{root}/{name}"


def list_files(fs: Any, root: str) -> dict[str, int | None]:
    """basename -> size (None where the source does not say) of the plain files in a folder."""
    entries = fs.ls(root, detail=True)
    files: dict[str, int | None] = {}
    for entry in entries:
        name = str(entry["name"])
        if entry.get("type") == "directory" or name.endswith("/"):
            continue
        base = name.rstrip("/").rsplit("/", 1)[-1]
        if not base or "?" in base or "#" in base:  # index-page sort links and anchors
            continue
        size = entry.get("size")
        files[base] = int(size) if size is not None else None
    return files


# ----------------------------------------------------------------------------------------------
# Planning


@dataclass
class FileTask:
    """One file to fetch: `source` (basename at the source) -> `target` (basename in DEST)."""

    source: str
    target: str
    size: int | None
    split: str | None = None  # None for metadata files
    original_index: int | None = None
    episodes: int | None = None


@dataclass
class SplitPlan:
    name: str
    total_shards: int
    total_episodes: int | None
    kept: list[FileTask] = field(default_factory=list)

    @property
    def episodes(self) -> int | None:
        counts = [t.episodes for t in self.kept]
        return None if None in counts else sum(c for c in counts if c is not None)

    @property
    def bytes(self) -> int | None:
        sizes = [t.size for t in self.kept]
        return None if None in sizes else sum(s for s in sizes if s is not None)


@dataclass
class DatasetPlan:
    entry: DatasetEntry
    fs: Any
    root: str
    info: dict[str, Any]
    tfds_name: str
    splits: dict[str, SplitPlan]
    metadata: list[FileTask]
    seed: int
    other_splits: str

    @property
    def tasks(self) -> list[FileTask]:
        return self.metadata + [t for s in self.splits.values() for t in s.kept]

    @property
    def bytes(self) -> int:
        return sum(t.size or 0 for t in self.tasks)


def choose_shards(n: int, fraction: float, seed: int, key: str) -> list[int]:
    """round(n * fraction) shard indices (at least one), sorted; a prefix of a seeded permutation,
    so with one seed a larger fraction keeps every shard a smaller one kept."""
    if n <= 0:
        return []
    k = min(n, max(1, round(n * fraction)))
    order = list(range(n))
    random.Random(f"{seed}/{key}").shuffle(order)  # str seeds hash with SHA-512: stable across runs
    return sorted(order[:k])


def shard_name(template: str, dataset: str, split: str, file_format: str, index: int, num: int) -> str:
    """Fill a tfds filepathTemplate for one shard."""
    values = {
        "DATASET": dataset,
        "SPLIT": split,
        "FILEFORMAT": file_format,
        "SHARD_X_OF_Y": f"{index:05d}-of-{num:05d}",
        "SHARD_INDEX": f"{index:05d}",
        "NUM_SHARDS": f"{num:05d}",
    }

    def fill(match: re.Match[str]) -> str:
        if match.group(1) not in values:
            raise DatasetError(f"unsupported placeholder {{{match.group(1)}}} in filepathTemplate {template!r}")
        return values[match.group(1)]

    return re.sub(r"\{([A-Z_]+)\}", fill, template)


def _split_layout(info: dict[str, Any], split: dict[str, Any]) -> tuple[int, list[int] | None]:
    lengths = [int(n) for n in split.get("shardLengths", [])]
    if lengths:
        return len(lengths), lengths
    return int(split.get("numShards", 0)), None  # old infos name a count only


def plan_dataset(entry: DatasetEntry, seed: int, other_splits: str = "fraction",
                 timeout: float = DEFAULT_TIMEOUT) -> DatasetPlan:
    """List the source, read its dataset_info.json and choose the files to fetch (fetches no shard)."""
    probe_source(entry.source, timeout)
    try:
        fs, root = open_source(entry.source, timeout)
        listing = list_files(fs, root)
    except Exception as err:  # noqa: BLE001 - any transport error means the source is unusable
        raise DatasetError(f"cannot list {entry.source}: {type(err).__name__}: {err}") from err
    if "dataset_info.json" not in listing:
        raise DatasetError(f"{entry.source} has no dataset_info.json (found {len(listing)} files); wrong source or version?")
    try:
        info = json.loads(fs.cat_file(_join(root, "dataset_info.json")))
    except Exception as err:  # noqa: BLE001
        raise DatasetError(f"cannot read {entry.source}/dataset_info.json: {err}") from err
    log.info("%s: listed %d files at %s", entry.name, len(listing), entry.source)
    if str(info.get("version", entry.version)) != entry.version:
        log.warning("%s: the mixture says version %s, the source's dataset_info.json %s",
                    entry.name, entry.version, info.get("version"))

    tfds_name = str(info.get("name") or entry.name)
    file_format = str(info.get("fileFormat") or "tfrecord")
    splits: dict[str, SplitPlan] = {}
    shard_files: set[str] = set()
    for split in info.get("splits", []):
        name = str(split["name"])
        template = str(split.get("filepathTemplate") or DEFAULT_TEMPLATE)
        total, lengths = _split_layout(info, split)
        names = [shard_name(template, tfds_name, name, file_format, i, total) for i in range(total)]
        shard_files.update(names)
        missing = [n for n in names if n not in listing]
        if name == "train":
            fraction: float | None = entry.fraction
        else:
            fraction = {"none": None, "fraction": entry.fraction, "all": 1.0}[other_splits]
        if fraction is None:
            continue
        if missing:
            raise DatasetError(f"split {name}: {len(missing)} of {total} shards listed in dataset_info.json are "
                               f"missing at the source, e.g. {missing[0]}")
        chosen = choose_shards(total, fraction, seed, f"{entry.name}/{name}")
        plan = SplitPlan(name, total, sum(lengths) if lengths else None)
        for new_index, old_index in enumerate(chosen):
            plan.kept.append(FileTask(
                source=names[old_index],
                target=shard_name(template, tfds_name, name, file_format, new_index, len(chosen)),
                size=listing[names[old_index]],
                split=name,
                original_index=old_index,
                episodes=lengths[old_index] if lengths else None,
            ))
        splits[name] = plan
    if "train" not in splits:
        raise DatasetError(f"{entry.source}: dataset_info.json has no train split")
    metadata = [
        FileTask(source=n, target=ORIG_INFO if n == "dataset_info.json" else n, size=listing[n])
        for n in sorted(listing) if n not in shard_files
    ]
    dataset = DatasetPlan(entry, fs, root, info, tfds_name, splits, metadata, seed, other_splits)
    _fill_unknown_sizes(dataset)
    return dataset


def _fill_unknown_sizes(plan: DatasetPlan) -> None:
    """HTTP listings carry no sizes: ask (HEAD) for the files we will fetch only."""
    unknown = [t for t in plan.tasks if t.size is None]
    if not unknown:
        return

    def size_of(task: FileTask) -> None:
        try:
            size = plan.fs.info(_join(plan.root, task.source)).get("size")
            task.size = int(size) if size is not None else None
        except Exception as err:  # noqa: BLE001 - a size we cannot learn is checked after the fetch instead
            log.debug("%s: no size for %s: %s", plan.entry.name, task.source, err)

    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(size_of, unknown))


# ----------------------------------------------------------------------------------------------
# Fetching


class Progress:
    """Byte progress bars: one overall, one for the dataset in flight (off when not on a terminal)."""

    def __init__(self, total: int, enabled: bool | None = None) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self._disable = None if enabled is None else not enabled
        self.overall = tqdm(total=total, unit="B", unit_scale=True, desc="all", position=0, disable=self._disable)
        self.current: Any = None
        self._lock = threading.Lock()

    def start(self, name: str, total: int) -> None:
        self.current = self._tqdm(total=total, unit="B", unit_scale=True, desc=name, position=1,
                                  leave=False, disable=self._disable)

    def update(self, n: int) -> None:
        with self._lock:
            self.overall.update(n)
            if self.current is not None:
                self.current.update(n)

    def finish(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None

    def close(self) -> None:
        self.finish()
        self.overall.close()


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.part")


def fetch_once(fs: Any, url: str, dest: Path, on_bytes: Callable[[int], None]) -> tuple[int, str]:
    """Stream one remote file into `dest` (a temp path); returns (bytes, sha256)."""
    digest, size = hashlib.sha256(), 0
    with fs.open(url, "rb") as src, open(dest, "wb") as out:
        while chunk := src.read(CHUNK):
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
            on_bytes(len(chunk))
    return size, digest.hexdigest()


def _is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def fetch_file(
    plan: DatasetPlan, task: FileTask, out_dir: Path, progress: Progress, retries: int, backoff: float,
    stop: threading.Event,
) -> dict[str, Any]:
    """Fetch `task` into out_dir/target via a temp file; retry transport errors, refetch a size mismatch once."""
    url = _join(plan.root, task.source)
    final, temp = out_dir / task.target, _temp_name(out_dir / task.target)
    size_mismatches, attempt = 0, 0
    while True:
        if stop.is_set():
            raise DatasetError("stopped")
        attempt += 1
        done = 0

        def count(n: int) -> None:
            nonlocal done
            done += n
            progress.update(n)

        try:
            size, sha = fetch_once(plan.fs, url, temp, count)
        except BaseException as err:
            progress.update(-done)
            temp.unlink(missing_ok=True)
            if not isinstance(err, Exception):  # interrupted: stop the other workers too
                stop.set()
                raise
            if _is_disk_full(err):
                stop.set()  # every other file would fail the same way
                raise DiskFullError(err.errno, f"disk full while writing {final}") from err
            if not is_transient(err):
                stop.set()
                raise DatasetError(f"{task.source}: {type(err).__name__}: {err} (not retried: retrying cannot fix it)") from err
            if attempt > retries:
                stop.set()
                raise DatasetError(f"{task.source}: failed after {attempt} attempts: {type(err).__name__}: {err}") from err
            log.warning("%s: %s: %s (attempt %d of %d), retrying", plan.entry.name, task.source, err, attempt, retries + 1)
            time.sleep(backoff * 2 ** (attempt - 1))
            continue
        if task.size is not None and size != task.size:
            progress.update(-done)
            temp.unlink(missing_ok=True)
            size_mismatches += 1
            if size_mismatches > 1:
                stop.set()
                raise DatasetError(f"{task.source}: got {size} bytes twice, the listing says {task.size}")
            log.warning("%s: %s: got %d bytes, the listing says %d; fetching it once more",
                        plan.entry.name, task.source, size, task.size)
            continue
        os.replace(temp, final)
        log.debug("%s: wrote %s (%d bytes)", plan.entry.name, final, size)
        return {"size": size, "sha256": sha}


def rewrite_dataset_info(info: dict[str, Any], plan: DatasetPlan, sizes: dict[str, int]) -> dict[str, Any]:
    """dataset_info.json for the subset: kept splits only, their shardLengths and numBytes."""
    new = json.loads(json.dumps(info))
    new_splits = []
    for split in new.get("splits", []):
        kept = plan.splits.get(split["name"])
        if kept is None:
            continue
        split.pop("statistics", None)  # per-split statistics describe the whole split; they would lie
        if "numShards" in split:
            split["numShards"] = str(len(kept.kept))
        if kept.episodes is not None:
            split["shardLengths"] = [str(t.episodes) for t in kept.kept]
            split["numBytes"] = str(sum(sizes[t.target] - TFRECORD_OVERHEAD * (t.episodes or 0) for t in kept.kept))
        elif "numBytes" in split:
            split["numBytes"] = str(sum(sizes[t.target] for t in kept.kept))
        new_splits.append(split)
    new["splits"] = new_splits
    return new


def _write_json(path: Path, data: Any) -> None:
    try:
        atomic.write_json(path, data)
    except OSError as err:
        if _is_disk_full(err):
            raise DiskFullError(err.errno, f"disk full while writing {path}") from err
        raise


def _manifest(plan: DatasetPlan, files: dict[str, dict[str, Any]], complete: bool) -> dict[str, Any]:
    entry = plan.entry

    def record(task: FileTask) -> dict[str, Any]:
        done = files.get(task.target, {})
        row = {"file": task.target, "source_file": task.source, "size": done.get("size", task.size),
               "sha256": done.get("sha256")}
        if task.split is not None:
            row.update(original_index=task.original_index, episodes=task.episodes)
        return row

    return {
        "dataset": entry.name,
        "version": entry.version,
        "tfds_name": plan.tfds_name,
        "source": entry.source,
        "seed": plan.seed,
        "fraction": entry.fraction,
        "other_splits": plan.other_splits,
        "options": entry.options,
        "weight": entry.weight,
        "tool": f"data_tools.download {TOOL_VERSION}",
        "complete": complete,
        "splits": {
            s.name: {
                "total_shards": s.total_shards,
                "kept_shards": len(s.kept),
                "total_episodes": s.total_episodes,
                "episodes": s.episodes,
                "bytes": sum(files.get(t.target, {}).get("size", t.size or 0) for t in s.kept),
                "shards": [record(t) for t in s.kept],
            }
            for s in plan.splits.values()
        },
        "metadata_files": [record(t) for t in plan.metadata],
    }


def _previous_files(out_dir: Path, plan: DatasetPlan) -> dict[str, dict[str, Any]]:
    """Files an earlier run finished (per its manifest) that this plan wants, by source file.

    A file that now has another target name (another fraction renumbers the shards) is renamed
    instead of fetched again: a larger fraction with the same seed only fetches the new shards.
    """
    path = out_dir / MANIFEST
    try:
        old = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        old = {}
    if old.get("source") != plan.entry.source:
        return {}
    rows = [r for s in old.get("splits", {}).values() for r in s.get("shards", [])] + old.get("metadata_files", [])
    on_disk = {
        r["source_file"]: r for r in rows
        if r.get("sha256") and r.get("file") and (out_dir / r["file"]).is_file()
        and (out_dir / r["file"]).stat().st_size == r.get("size")
    }
    done: dict[str, dict[str, Any]] = {}
    moves: list[tuple[str, str]] = []
    for task in plan.tasks:
        row = on_disk.get(task.source)
        if row is None or task.size not in (None, row["size"]):
            continue
        done[task.target] = {"size": row["size"], "sha256": row["sha256"]}
        if row["file"] != task.target:
            moves.append((row["file"], task.target))
    # two phases, so that a file may take a name another one is about to leave
    for old_name, _ in moves:
        os.replace(out_dir / old_name, out_dir / f".{old_name}.move")
    for old_name, new_name in moves:
        os.replace(out_dir / f".{old_name}.move", out_dir / new_name)
    if moves:
        log.info("%s: renamed %d files kept from an earlier download", plan.entry.name, len(moves))
    return done


def _remove_stale(out_dir: Path, plan: DatasetPlan) -> None:
    """Shards of an earlier, different plan (other seed or fraction) would be silently ignored by tfds."""
    targets = {t.target for t in plan.tasks}
    pattern = re.compile(rf"^{re.escape(plan.tfds_name)}-[^.]+\.[a-z_]+-\d{{5}}-of-\d{{5}}$")
    for path in out_dir.iterdir():
        if path.is_file() and pattern.match(path.name) and path.name not in targets:
            log.warning("%s: removing %s left by an earlier download with another plan", plan.entry.name, path.name)
            path.unlink()


@dataclass
class DatasetResult:
    name: str
    ok: bool
    fetched: int = 0
    skipped: int = 0
    bytes: int = 0
    episodes: int | None = None
    error: str = ""


def download_dataset(
    plan: DatasetPlan, dest: Path, *, workers: int = 8, retries: int = 3, backoff: float = 1.0,
    progress: Progress | None = None,
) -> DatasetResult:
    """Fetch a planned dataset into dest/<name>/<version>; resumable. Raises DiskFullError."""
    out_dir = dest / plan.entry.name / plan.entry.version
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = progress or Progress(plan.bytes, enabled=False)
    files = _previous_files(out_dir, plan)
    _remove_stale(out_dir, plan)
    todo = [t for t in plan.tasks if t.target not in files]
    skipped = len(plan.tasks) - len(todo)
    progress.start(plan.entry.name, plan.bytes)
    if skipped:
        log.info("%s: %d of %d files already complete, skipping them", plan.entry.name, skipped, len(plan.tasks))
        progress.update(sum(files[t.target]["size"] for t in plan.tasks if t.target in files))
    lock, stop = threading.Lock(), threading.Event()
    _write_json(out_dir / MANIFEST, _manifest(plan, files, complete=False))
    first_error: BaseException | None = None
    try:
        with cf.ThreadPoolExecutor(max(1, workers)) as pool:
            futures = {pool.submit(fetch_file, plan, t, out_dir, progress, retries, backoff, stop): t for t in todo}
            for future in cf.as_completed(futures):
                task = futures[future]
                try:
                    result = future.result()
                except BaseException as err:  # noqa: BLE001 - first failure stops the dataset
                    if first_error is None:
                        first_error = err
                        stop.set()
                        for other in futures:
                            other.cancel()
                    continue
                with lock:
                    files[task.target] = result
                    # the manifest doubles as the resume state: rewrite it after every finished file
                    _write_json(out_dir / MANIFEST, _manifest(plan, files, complete=False))
    finally:
        for temp in out_dir.glob(".*.part"):
            temp.unlink(missing_ok=True)
        progress.finish()
    if first_error is not None:
        if isinstance(first_error, (DiskFullError, KeyboardInterrupt, SystemExit)):
            raise first_error
        if isinstance(first_error, DatasetError) and str(first_error) != "stopped":
            raise first_error
        raise DatasetError(f"{type(first_error).__name__}: {first_error}") from first_error

    sizes = {t.target: files[t.target]["size"] for t in plan.tasks}
    _write_json(out_dir / "dataset_info.json", rewrite_dataset_info(plan.info, plan, sizes))
    _write_json(out_dir / MANIFEST, _manifest(plan, files, complete=True))
    episodes = plan.splits["train"].episodes
    log.info("%s: complete in %s (%d fetched, %d already there)", plan.entry.name, out_dir, len(todo), skipped)
    return DatasetResult(plan.entry.name, True, len(todo), skipped, sum(sizes.values()), episodes)


# ----------------------------------------------------------------------------------------------
# CLI


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return str(n)


def format_plan(plans: Iterable[DatasetPlan]) -> str:
    rows = [f"{'dataset':<56} {'split':<6} {'shards':>11} {'episodes':>15} {'bytes':>10}"]
    total_bytes, total_eps, unknown = 0, 0, False
    for plan in plans:
        for s in plan.splits.values():
            eps = s.episodes
            eps_text = f"{eps}/{s.total_episodes}" if eps is not None else "?"
            rows.append(f"{plan.entry.name:<56} {s.name:<6} {len(s.kept):>5}/{s.total_shards:<5} "
                        f"{eps_text:>15} {_human(s.bytes):>10}")
            total_bytes += s.bytes or 0
            total_eps += eps or 0
            unknown |= eps is None or s.bytes is None
        total_bytes += sum(t.size or 0 for t in plan.metadata)
    rows.append(f"total: {total_eps} episodes, {_human(total_bytes)}" + (" (some sizes unknown)" if unknown else ""))
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.download",
        description="Download a seeded fraction of the train shards of each dataset in a mixture file "
                    "(RLDS/TFDS datasets from gs://, https:// or local folders), resumably.",
        epilog="Exit codes: 0 all datasets complete (or planned, with --dry-run), 1 some dataset failed "
               "(the others still finish), 2 bad input, 130 interrupted (rerun to resume).",
    )
    parser.add_argument("--mixture", required=True, help="mixture YAML file, or a shipped name (e.g. default, bridge)")
    add_output(parser, "--dest", help="folder that receives OUT/<name>/<version>/")
    parser.add_argument("--source-root", default=os.environ.get(SOURCE_ROOT_ENV) or None, metavar="ROOT",
                        help=f"read every dataset from ROOT/<name>/<version> (a local copy laid out like the OXE "
                             f"bucket, or a URL) instead of the mixture's sources; default: ${SOURCE_ROOT_ENV} if set")
    parser.add_argument("--seed", type=int, default=0, help="shard choice seed (default 0)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, fetch nothing")
    parser.add_argument("--workers", type=int, default=8, help="parallel file downloads (default 8)")
    parser.add_argument("--other-splits", choices=OTHER_SPLITS, default="fraction",
                        help="non-train splits: none, the same fraction as train (default), or all")
    parser.add_argument("--retries", type=int, default=3,
                        help="retries per file on transient errors (timeouts, resets, 5xx; default 3)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"connect / DNS / stalled-read timeout in seconds (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="download only these datasets of the mixture")
    add_common_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    setup_logging(args, fmt="%(levelname)s %(message)s")
    with _probe_lock:
        _probe_cache.clear()  # a host that was down in an earlier call (library use) gets another chance
    if not args.verbose:  # transport libraries log tracebacks for errors this tool reports itself
        for noisy in ("gcsfs", "fsspec", "aiohttp"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)

    try:
        mixture = load_mixture(args.mixture, source_root=args.source_root)
    except MixtureError as err:
        log.error("%s", err)
        return 2
    entries = list(mixture.datasets)
    if args.only:
        unknown = sorted(set(args.only) - {e.name for e in entries})
        if unknown:
            log.error("--only: %s not in mixture %s", ", ".join(unknown), mixture.name)
            return 2
        entries = [e for e in entries if e.name in args.only]
    where = f", from {args.source_root}" if args.source_root else ""
    log.info("mixture %s: %d datasets, seed %d%s", mixture.name, len(entries), args.seed, where)

    failures: dict[str, str] = {}
    plans: list[DatasetPlan] = []
    for entry in entries:
        try:
            plans.append(plan_dataset(entry, args.seed, args.other_splits, timeout=args.timeout))
        except DatasetError as err:
            log.error("%s: %s", entry.name, err)
            failures[entry.name] = str(err)
    print(format_plan(plans))
    if args.dry_run:
        for name, err in failures.items():
            print(f"  FAILED  {name}: {err}")
        return 1 if failures else 0

    results: list[DatasetResult] = []
    progress = Progress(sum(p.bytes for p in plans), enabled=False if args.no_progress else None)
    try:
        for plan in plans:
            try:
                results.append(download_dataset(plan, args.out, workers=args.workers, retries=args.retries,
                                                progress=progress))
            except DatasetError as err:
                log.error("%s: %s", plan.entry.name, err)
                failures[plan.entry.name] = str(err)
            except DiskFullError as err:
                log.error("%s: %s; temp files removed, finished files kept; free space and rerun", plan.entry.name, err)
                failures[plan.entry.name] = str(err)
                break
    except KeyboardInterrupt:
        log.error("interrupted; finished files are kept, rerun the same command to resume")
        return 130
    finally:
        progress.close()

    print(f"\nsummary ({args.out}):")
    for r in results:
        print(f"  ok      {r.name}: {r.fetched} fetched, {r.skipped} already complete, {_human(r.bytes)}, "
              f"{r.episodes if r.episodes is not None else '?'} train episodes")
    for name, err in failures.items():
        print(f"  FAILED  {name}: {err}")
    not_done = [p.entry.name for p in plans if p.entry.name not in failures and p.entry.name not in {r.name for r in results}]
    for name in not_done:
        print(f"  skipped {name}: not started")
    return 1 if failures or not_done else 0


if __name__ == "__main__":
    sys.exit(main())
