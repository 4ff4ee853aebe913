"""Write small, valid TFDS/RLDS datasets that follow the exact feature schemas of real OXE datasets.

The converter and the downloader must meet the real Open X-Embodiment layouts (nested `steps`
datasets, JPEG/PNG images, zlib tensors, int-encoded instructions) without the hundreds of GB of
real data. This module rebuilds each dataset's `tfds.features.FeaturesDict` from its
`features.json`, fills it with seeded synthetic episodes and serializes them with tfds' own
feature encoders and example serializer into ordinary TFRecord shards plus a `dataset_info.json`
built from tfds' DatasetInfo proto, so `tfds.builder_from_directory` reads the result like the
real thing.

    python -m llava_vla_plugin.apps.rlds_fixture /tmp/fake --schema bridge_orig --episodes 8
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # tfds/tf are heavy; import them only where data is really written
    import tensorflow_datasets as tfds

__all__ = [
    "available_schemas",
    "load_features",
    "schema_info",
    "write_rlds_dataset",
    "shard_filename",
    "main",
]

log = logging.getLogger(__name__)

BUNDLED_SCHEMAS = Path(__file__).resolve().parent / "schemas"
SCHEMAS_ENV = "OXE_SCHEMAS_DIR"
FILEPATH_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"

StepFn = Callable[[int, int, np.random.Generator], Mapping[str, Any]]

_WORDS = {
    "verb": ["put", "move", "pick up", "push", "place", "open", "close", "stack", "wipe", "turn"],
    "obj": ["the cup", "the red block", "the spoon", "the carrot", "the towel", "the pot",
            "the green can", "the drawer", "the blue bowl", "the sponge"],
    "prep": ["in", "on", "next to", "into", "onto", "near"],
    "place": ["the sink", "the plate", "the table", "the left burner", "the basket",
              "the top shelf", "the tray", "the bowl"],
}
# Leaf names under which OXE datasets store the task text (as Text or string Tensor).
_INSTRUCTION_TEXT_KEYS = {
    "language_instruction",
    "natural_language_instruction",
    "structured_language_instruction",
    "episode_language_instruction",
    "episode_task",
}


# ----------------------------------------------------------------------------------------------
# Schemas


def _external_schema_root() -> Path | None:
    """The shared schema folder: $OXE_SCHEMAS_DIR, else `shared/oxe_schemas` above this file."""
    env = os.environ.get(SCHEMAS_ENV)
    if env:
        return Path(env) if Path(env).is_dir() else None
    for parent in [Path.cwd(), *Path(__file__).resolve().parents]:
        candidate = parent / "shared" / "oxe_schemas"
        if candidate.is_dir():
            return candidate
    return None


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else -1 for p in version.split("."))


def _scan(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for features in sorted(root.glob("*/*/features.json")):
        name, version_dir = features.parent.parent.name, features.parent
        # Several versions of one dataset: the newest wins.
        if name not in found or _version_key(version_dir.name) > _version_key(found[name].name):
            found[name] = version_dir
    return found


def available_schemas() -> dict[str, Path]:
    """Map schema name (OpenVLA's dataset name) -> directory holding its features.json.

    The four bundled schemas are always there; the 27 of `shared/oxe_schemas` are added when that
    folder is found (the environment variable OXE_SCHEMAS_DIR names it explicitly).
    """
    schemas = _scan(BUNDLED_SCHEMAS)
    external = _external_schema_root()
    if external is not None:
        for name, path in _scan(external).items():
            schemas.setdefault(name, path)
    return dict(sorted(schemas.items()))


def _schema_dir(schema: str | os.PathLike[str]) -> Path:
    path = Path(schema)
    if path.is_file() and path.name == "features.json":
        return path.parent
    if (path / "features.json").is_file():
        return path
    known = available_schemas()
    text = str(schema)
    if text in known:
        return known[text]
    if "/" in text:  # "name/version"
        name, version = text.split("/", 1)
        for root in filter(None, [BUNDLED_SCHEMAS, _external_schema_root()]):
            if (root / name / version / "features.json").is_file():
                return root / name / version
    raise ValueError(f"unknown schema {text!r}; known: {', '.join(known)}")


def schema_info(schema: str | os.PathLike[str]) -> dict[str, Any]:
    """The schema's dataset_info.json (tfds name, version, split names); {} where absent."""
    info = _schema_dir(schema) / "dataset_info.json"
    return json.loads(info.read_text()) if info.is_file() else {}


def _resize_images(node: Any, image_size: tuple[int, int]) -> None:
    """Set H, W of every Image feature in a features.json tree (in place)."""
    if isinstance(node, dict):
        if node.get("pythonClassName", "").endswith("image_feature.Image"):
            dims = node["image"]["shape"]["dimensions"]
            node["image"]["shape"]["dimensions"] = [str(image_size[0]), str(image_size[1]), *dims[2:]]
        for value in node.values():
            _resize_images(value, image_size)
    elif isinstance(node, list):
        for value in node:
            _resize_images(value, image_size)


def load_features(
    schema: str | os.PathLike[str], image_size: tuple[int, int] | None = None
) -> tfds.features.FeaturesDict:
    """Rebuild the tfds FeaturesDict of a schema (name, "name/version", features.json or its dir)."""
    import tensorflow_datasets as tfds

    spec = json.loads((_schema_dir(schema) / "features.json").read_text())
    if image_size is not None:
        _resize_images(spec, image_size)
    return tfds.features.FeatureConnector.from_json(spec)


# ----------------------------------------------------------------------------------------------
# Synthetic values


def _instruction(rng: np.random.Generator) -> str:
    pick = lambda key: _WORDS[key][rng.integers(len(_WORDS[key]))]  # noqa: E731
    return f"{pick('verb')} {pick('obj')} {pick('prep')} {pick('place')}"


class _ImageMaker:
    """Smooth random images: a tiny random grid per camera and episode, drifting over the steps,
    upsampled bilinearly. JPEG is encoded with PIL (fast, deterministic); tfds gets the bytes."""

    def __init__(self) -> None:
        self._blank: dict[tuple[Any, ...], bytes | np.ndarray] = {}

    def frame(self, feature: Any, grids: tuple[np.ndarray, np.ndarray], t: float, present: bool):
        from PIL import Image

        h, w, c = feature.shape
        dtype, fmt = np.dtype(feature.np_dtype), feature.encoding_format or "png"
        if not present:  # absent cameras are stored as black frames, as in Bridge
            key = (h, w, c, dtype.str, fmt)
            if key not in self._blank:
                self._blank[key] = self._encode(np.zeros((h, w, c), dtype), fmt)
            return self._blank[key]
        grid = grids[0] * (1.0 - t) + grids[1] * t  # (gh, gw, c) in [0, 1]
        if dtype == np.uint8 and c == 3:
            small = Image.fromarray((grid * 255).astype(np.uint8))
            return self._encode(small.resize((w, h), Image.BILINEAR), fmt)
        planes = [
            np.asarray(Image.fromarray(grid[..., i].astype(np.float32)).resize((w, h), Image.BILINEAR))
            for i in range(c)
        ]
        unit = np.stack(planes, axis=-1)
        if dtype == np.uint8:
            return self._encode((unit * 255).astype(np.uint8), fmt)
        if dtype == np.uint16:  # depth in millimetres
            return self._encode((unit * 3000).astype(np.uint16), fmt)
        return (unit * 2.0).astype(dtype)  # float depth in metres; tfds bit-casts it to PNG

    @staticmethod
    def _encode(image: Any, fmt: str) -> bytes | np.ndarray:
        from PIL import Image

        if fmt == "jpeg":
            if isinstance(image, np.ndarray):
                image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=90)
            return buf.getvalue()
        array = np.asarray(image)
        if not (array.dtype == np.uint16 and array.shape[-1] == 1
                or array.dtype == np.uint8 and array.shape[-1] in (1, 3, 4)):
            return array  # e.g. float depth: tfds' own encoder bit-casts it to a 4-channel PNG
        # PIL with fast zlib settings: tf.image.encode_png is ~10x slower on large depth maps.
        squeezed = array[..., 0] if array.shape[-1] == 1 else array
        buf = io.BytesIO()
        Image.fromarray(squeezed).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()


class _EpisodeMaker:
    def __init__(self, features: Any, dataset_name: str) -> None:
        import tensorflow_datasets as tfds

        self._tfds = tfds
        self.features = features
        self.dataset_name = dataset_name
        self.images = _ImageMaker()
        self.step_feature = features["steps"].feature if "steps" in features else None
        # Bridge-style datasets say per episode which cameras recorded (episode_metadata/has_image_k)
        self.camera_flags = "episode_metadata" in features and any(
            k.startswith("has_") for k in features["episode_metadata"].keys()
        )

    def episode(
        self,
        split: str,
        index: int,
        n_steps: int,
        rng: np.random.Generator,
        empty_instruction: bool,
        step_fn: StepFn | None,
    ) -> dict[str, Any]:
        instruction = "" if empty_instruction else _instruction(rng)
        ctx: dict[str, Any] = {
            "split": split,
            "index": index,
            "instruction": instruction,
            "rng": rng,
            "n_steps": n_steps,
            "episode_const": {},  # values constant over an episode (embeddings, camera presence)
            "grids": {},
        }
        example: dict[str, Any] = {}
        for key, feature in self.features.items():
            if key == "steps":
                continue
            example[key] = self._value(key, feature, ctx, step=None)
        steps = []
        for t in range(n_steps):
            step = self._value("", self.step_feature, ctx, step=t)
            if step_fn is not None:
                _deep_update(step, step_fn(index, t, rng))
            steps.append(step)
        example["steps"] = steps
        return example

    def _value(self, path: str, feature: Any, ctx: dict[str, Any], step: int | None) -> Any:
        f = self._tfds.features
        if isinstance(feature, f.FeaturesDict):
            return {k: self._value(f"{path}/{k}", v, ctx, step) for k, v in feature.items()}
        if isinstance(feature, f.Image):
            return self._image(path, feature, ctx, step or 0)
        if isinstance(feature, f.Text):
            return self._text(path, ctx)
        if isinstance(feature, f.Tensor):
            return self._tensor(path, feature, ctx, step)
        raise TypeError(f"{path}: feature type {type(feature).__name__} is not supported")

    def _present(self, path: str, ctx: dict[str, Any]) -> bool:
        """Bridge-style `episode_metadata/has_<camera>` flags decide whether a camera recorded."""
        camera = path.rsplit("/", 1)[-1]
        flags = ctx["episode_const"].setdefault("has", {})
        if camera not in flags:
            # the main camera always records, others about half the time
            flags[camera] = camera in ("image_0", "image") or bool(ctx["rng"].random() < 0.5)
        return flags[camera]

    def _image(self, path: str, feature: Any, ctx: dict[str, Any], step: int):
        grids = ctx["grids"].get(path)
        if grids is None:
            c = feature.shape[-1]
            gh, gw = ctx["rng"].integers(2, 6, size=2)
            grids = ctx["grids"][path] = (
                ctx["rng"].random((gh, gw, c)),
                ctx["rng"].random((gh, gw, c)),
            )
        present = self._present(path, ctx) if self.camera_flags else True
        t = step / max(ctx["n_steps"] - 1, 1)
        return self.images.frame(feature, grids, t, present)

    def _text(self, path: str, ctx: dict[str, Any]) -> str:
        leaf = path.rsplit("/", 1)[-1]
        if leaf in _INSTRUCTION_TEXT_KEYS:
            return ctx["instruction"]
        if leaf == "file_path":
            return f"/data/{self.dataset_name}/{ctx['split']}/episode_{ctx['index']:06d}.npy"
        return " ".join(_WORDS["obj"][ctx["rng"].integers(len(_WORDS["obj"]))].split()[1:])

    def _tensor(self, path: str, feature: Any, ctx: dict[str, Any], step: int | None) -> Any:
        leaf = path.rsplit("/", 1)[-1]
        shape, dtype = tuple(feature.shape), np.dtype(feature.np_dtype)
        rng: np.random.Generator = ctx["rng"]
        last = step is not None and step == ctx["n_steps"] - 1
        const = ctx["episode_const"]

        if dtype.kind in "OSU":  # tf.string tensors
            if leaf in _INSTRUCTION_TEXT_KEYS:
                return ctx["instruction"]
            if leaf in ("file_path", "episode_id"):
                return f"/data/{self.dataset_name}/{ctx['split']}/episode_{ctx['index']:06d}"
            return "none"
        if leaf == "is_first":
            return step == 0
        if leaf in ("is_last", "is_terminal"):
            return last
        if leaf.startswith("has_"):
            if leaf == "has_language":
                return bool(ctx["instruction"])
            return self._present(leaf[len("has_"):], ctx)
        if leaf in ("success", "already_success", "episode_success"):
            flag = const.setdefault("success", bool(rng.random() < 0.7))
            return flag if dtype == np.bool_ else dtype.type(flag)
        if leaf == "instruction" and dtype.kind in "iu":  # language_table: UTF-8 code units, NUL-padded
            codes = np.zeros(shape, dtype)
            raw = np.frombuffer(ctx["instruction"].encode(), np.uint8)[: shape[0]]
            codes[: len(raw)] = raw
            return codes
        if leaf.endswith("language_embedding"):
            if leaf not in const:
                const[leaf] = rng.normal(0, 0.05, shape).astype(dtype)
            return const[leaf]
        if leaf == "terminate_episode":
            if shape == ():
                return dtype.type(last)
            onehot = np.zeros(shape, dtype)
            onehot.flat[0 if last else 1] = 1
            return onehot
        if leaf == "reward":
            return dtype.type(last)
        if leaf == "discount":
            return dtype.type(1)
        if dtype == np.bool_:
            return rng.random(shape) < 0.5 if shape else bool(rng.random() < 0.5)
        if dtype.kind in "iu":
            return rng.integers(0, 4, size=shape).astype(dtype) if shape else dtype.type(rng.integers(0, 4))
        return rng.normal(0.0, 0.1, size=shape).astype(dtype) if shape else dtype.type(rng.normal(0.0, 0.1))


def _deep_update(base: dict[str, Any], override: Mapping[str, Any]) -> None:
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


# ----------------------------------------------------------------------------------------------
# Writing


def shard_filename(tfds_name: str, split: str, index: int, num_shards: int) -> str:
    """TFDS' default shard file name, e.g. `bridge_dataset-train.tfrecord-00000-of-00004`."""
    return f"{tfds_name}-{split}.tfrecord-{index:05d}-of-{num_shards:05d}"


def _split_seed(split: str) -> int:
    return zlib.crc32(split.encode())


def _shard_sizes(episodes: int, shards: int) -> list[int]:
    base, extra = divmod(episodes, shards)
    return [base + (i < extra) for i in range(shards)]


def write_rlds_dataset(
    root: str | os.PathLike[str],
    name: str,
    version: str | None = None,
    *,
    schema: str | os.PathLike[str] | None = None,
    splits: Mapping[str, int] | None = None,
    steps: int | tuple[int, int] = 5,
    shards: int | Mapping[str, int] = 1,
    image_size: tuple[int, int] | None = None,
    empty_instruction_episodes: Iterable[int] = (),
    seed: int = 0,
    tfds_name: str | None = None,
    step_fn: StepFn | None = None,
) -> Path:
    """Write a synthetic TFDS dataset directory `root/name/version` and return its path.

    `schema` (default `name`) picks the feature schema; `splits` maps split -> episode count
    (default {"train": 4}); `steps` is a step count or an inclusive (min, max) range drawn per
    episode; `shards` is the shard count of every split, or {split: count} (missing splits get 1);
    episodes go over shards in order;
    `empty_instruction_episodes` are train-split episode indices whose instruction is "";
    `step_fn(episode_index, step_index, rng)` returns a (nested) dict overriding step values.
    The same arguments give byte-identical files.
    """
    import tensorflow as tf
    from google.protobuf import json_format
    from tensorflow_datasets.core.proto import dataset_info_pb2

    schema = name if schema is None else schema
    info = schema_info(schema)
    version = version or info.get("version") or "1.0.0"
    tfds_name = tfds_name or info.get("name") or name
    splits = dict(splits) if splits is not None else {"train": 4}
    lo, hi = (steps, steps) if isinstance(steps, int) else steps
    if not 1 <= lo <= hi:
        raise ValueError(f"steps must be >= 1 (min <= max), got {steps!r}")
    shard_counts = {s: shards if isinstance(shards, int) else shards.get(s, 1) for s in splits}
    for split, count in splits.items():
        if not 1 <= shard_counts[split] <= count:
            raise ValueError(f"split {split!r}: need 1 <= shards ({shard_counts[split]}) <= episodes ({count})")
    empty = set(empty_instruction_episodes)

    features = load_features(schema, image_size)
    maker = _EpisodeMaker(features, name)
    out = Path(root) / name / version
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{tfds_name}-*.tfrecord-*"):
        stale.unlink()  # a rewrite with fewer shards must not leave old ones behind
    features.save_config(str(out))

    proto = dataset_info_pb2.DatasetInfo(
        name=tfds_name,
        version=version,
        description=f"Synthetic test data with the feature schema of {name} (llava_vla_plugin.apps.rlds_fixture).",
        file_format="tfrecord",
        module_name="llava_vla_plugin.apps.rlds_fixture",
    )
    started = time.perf_counter()
    for split, count in splits.items():
        sizes = _shard_sizes(count, shard_counts[split])
        num_bytes, episode = 0, 0
        for shard, size in enumerate(sizes):
            path = out / shard_filename(tfds_name, split, shard, len(sizes))
            with tf.io.TFRecordWriter(str(path)) as writer:
                for _ in range(size):
                    rng = np.random.default_rng([seed, _split_seed(name), _split_seed(split), episode])
                    n_steps = int(rng.integers(lo, hi + 1))
                    example = maker.episode(
                        split, episode, n_steps, rng, split == "train" and episode in empty, step_fn
                    )
                    record = features.serialize_example(example)
                    writer.write(record)
                    num_bytes += len(record)  # tfds counts serialized example bytes, not file bytes
                    episode += 1
        proto.splits.add(
            name=split, shard_lengths=sizes, num_bytes=num_bytes, filepath_template=FILEPATH_TEMPLATE
        )
    (out / "dataset_info.json").write_text(json_format.MessageToJson(proto, sort_keys=True))
    log.info(
        "wrote %s (%s) in %.1fs", out, ", ".join(f"{s}: {n} episodes" for s, n in splits.items()),
        time.perf_counter() - started,
    )
    return out


# ----------------------------------------------------------------------------------------------
# CLI


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 64x64, got {text!r}") from None
    return h, w


def _parse_steps(text: str) -> int | tuple[int, int]:
    try:
        if "-" in text:
            lo, hi = (int(v) for v in text.split("-"))
            return lo, hi
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llava_vla_plugin.apps.rlds_fixture",
        description="Write a synthetic TFDS/RLDS dataset with the feature schema of a real OXE dataset.",
    )
    parser.add_argument("out", type=Path, help="root folder; the dataset goes to OUT/NAME/VERSION")
    parser.add_argument("--schema", required=True, help="schema name (see --list), name/version or path")
    parser.add_argument("--name", help="dataset folder name (default: the schema name)")
    parser.add_argument("--episodes", type=int, default=4, help="train episodes (default 4)")
    parser.add_argument("--val-episodes", type=int, default=0, help="episodes in a 'val' split (default none)")
    parser.add_argument("--steps", type=_parse_steps, default=5, help="steps per episode: N or MIN-MAX")
    parser.add_argument("--shards", type=int, default=1, help="shards per split, at most one per episode (default 1)")
    parser.add_argument("--image-size", type=_parse_size, help="HxW for every image (default: the schema's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="list the available schemas and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from llava_vla_plugin.core.env import import_quietly

    import_quietly("tensorflow_datasets")  # the README's CPU quick-start runs this: no TensorFlow start-up lines

    if args.list:
        for name, path in available_schemas().items():
            print(f"{name}\t{path}")
        return 0
    splits = {"train": args.episodes}
    if args.val_episodes:
        splits["val"] = args.val_episodes
    try:
        name = args.name or _schema_dir(args.schema).parent.name
        path = write_rlds_dataset(
            args.out, name, schema=args.schema, splits=splits, steps=args.steps,
            shards={"train": args.shards, "val": min(args.shards, args.val_episodes)},
            image_size=args.image_size, seed=args.seed,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
