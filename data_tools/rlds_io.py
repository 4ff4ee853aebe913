"""Streaming access to TFDS/RLDS datasets: layout via tfds, records and examples without TensorFlow.

The main process asks tfds (builder_from_directory) for the splits, shard files and feature schema.
Workers then read TFRecord files themselves (CRC-checked, record by record) and parse tf.train.Example
protos with a locally built descriptor, so they never import TensorFlow (seconds of start-up and
~1 GB of memory per process) and never decode an image: image features stay as their stored bytes.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

try:  # C implementation; a transitive dependency of gcsfs (google-cloud-storage)
    import google_crc32c as _crc32c
except ImportError:  # pragma: no cover - then records are length-checked and parsed, not checksummed
    _crc32c = None


class CorruptRecordError(RuntimeError):
    """A TFRecord file is truncated or fails its checksum / proto parse at a given record."""

    def __init__(self, path: str, record: int, reason: str):
        super().__init__(f"corrupt shard {path}: record {record}: {reason}")
        self.path, self.record, self.reason = path, record, reason


# ----------------------------------------------------------------------------------------------
# tf.train.Example without TensorFlow


def _example_class() -> type:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(name="data_tools_example.proto", package="data_tools.tf", syntax="proto3")
    F = descriptor_pb2.FieldDescriptorProto

    def msg(name: str, fields: list[tuple[str, int, int, int, str | None]], oneof: str | None = None):
        m = fdp.message_type.add(name=name)
        if oneof:
            m.oneof_decl.add(name=oneof)
        for fname, number, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name
            if oneof:
                f.oneof_index = 0
        return m

    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    msg("BytesList", [("value", 1, F.TYPE_BYTES, rep, None)])
    m = msg("FloatList", [("value", 1, F.TYPE_FLOAT, rep, None)])
    m.field[0].options.packed = True
    m = msg("Int64List", [("value", 1, F.TYPE_INT64, rep, None)])
    m.field[0].options.packed = True
    msg(
        "Feature",
        [
            ("bytes_list", 1, F.TYPE_MESSAGE, opt, ".data_tools.tf.BytesList"),
            ("float_list", 2, F.TYPE_MESSAGE, opt, ".data_tools.tf.FloatList"),
            ("int64_list", 3, F.TYPE_MESSAGE, opt, ".data_tools.tf.Int64List"),
        ],
        oneof="kind",
    )
    features = fdp.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=opt)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=opt, type_name=".data_tools.tf.Feature")
    features.field.add(
        name="feature", number=1, type=F.TYPE_MESSAGE, label=rep, type_name=".data_tools.tf.Features.FeatureEntry"
    )
    msg("Example", [("features", 1, F.TYPE_MESSAGE, opt, ".data_tools.tf.Features")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("data_tools.tf.Example"))


_EXAMPLE = None


def parse_example_proto(data: bytes) -> Any:
    global _EXAMPLE
    if _EXAMPLE is None:
        _EXAMPLE = _example_class()
    return _EXAMPLE.FromString(data)


# ----------------------------------------------------------------------------------------------
# TFRecord files


def _masked_crc(data: bytes) -> int:
    crc = _crc32c.value(data)  # type: ignore[union-attr]
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def iter_tfrecord(path: str | Path, skip: int = 0, take: int | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield (record index, payload) of records [skip, skip+take) of one TFRecord file, checksummed."""
    path = str(path)
    end = None if take is None or take < 0 else skip + take
    index = 0
    with open(path, "rb", buffering=1 << 20) as f:
        while end is None or index < end:
            header = f.read(12)
            if not header:
                if end is not None:
                    raise CorruptRecordError(path, index, f"file ends after {index} records, expected {end}")
                return
            if len(header) < 12:
                raise CorruptRecordError(path, index, "truncated record header")
            (length,) = struct.unpack("<Q", header[:8])
            if _crc32c is not None and struct.unpack("<I", header[8:])[0] != _masked_crc(header[:8]):
                raise CorruptRecordError(path, index, "length checksum mismatch")
            if index < skip:
                f.seek(length + 4, 1)
                index += 1
                continue
            payload = f.read(length)
            footer = f.read(4)
            if len(payload) < length or len(footer) < 4:
                raise CorruptRecordError(path, index, f"truncated record ({len(payload)} of {length} bytes)")
            if _crc32c is not None and struct.unpack("<I", footer)[0] != _masked_crc(payload):
                raise CorruptRecordError(path, index, "data checksum mismatch")
            yield index, payload
            index += 1


# ----------------------------------------------------------------------------------------------
# Schema and parsing


@dataclass(frozen=True)
class LeafSpec:
    """One serialized feature: where it lives and how tfds encoded it."""

    key: str  # flattened path, e.g. "steps/observation/image"
    kind: str  # "image" | "text" | "tensor"
    dtype: str  # numpy dtype name
    shape: tuple[int | None, ...]  # per-step (or per-episode) shape
    encoding: str = "none"  # tensor encoding: "none" | "zlib" | "bytes"
    image_format: str | None = None


def feature_leaves(features: Any) -> dict[str, LeafSpec]:
    """Flatten a tfds FeaturesDict into {flat key: LeafSpec}, as tfds' example serializer names them."""
    from data_tools.quiet_imports import import_quietly

    tfds = import_quietly("tensorflow_datasets")  # without TensorFlow's start-up lines

    out: dict[str, LeafSpec] = {}

    def walk(feat: Any, prefix: str) -> None:
        f = tfds.features
        if isinstance(feat, f.FeaturesDict):
            for k, v in feat.items():
                walk(v, f"{prefix}/{k}" if prefix else k)
        elif isinstance(feat, (f.Dataset, f.Sequence)):
            walk(feat.feature, prefix)
        elif isinstance(feat, f.Image):
            fmt = getattr(feat, "_encoding_format", None) or getattr(feat, "encoding_format", None)
            out[prefix] = LeafSpec(prefix, "image", np.dtype(feat.np_dtype).name, tuple(feat.shape), "none", fmt)
        elif isinstance(feat, f.Text):
            out[prefix] = LeafSpec(prefix, "text", "object", ())
        elif isinstance(feat, f.Tensor):
            enc = getattr(feat, "_encoding", None)
            enc_name = getattr(enc, "value", None) or (str(enc).split(".")[-1].lower() if enc else "none")
            out[prefix] = LeafSpec(prefix, "tensor", np.dtype(feat.np_dtype).name, tuple(feat.shape), enc_name)
        else:
            raise TypeError(f"unsupported feature type {type(feat).__name__} at {prefix!r}")

    walk(features, "")
    return out


def _decode_leaf(spec: LeafSpec, feature: Any, per_step: bool) -> Any:
    kind = feature.WhichOneof("kind")
    if spec.kind in ("image", "text") or spec.dtype == "object":
        # encoded images and strings stay bytes: nothing is decoded that the caller may just copy
        values = list(feature.bytes_list.value) if kind == "bytes_list" else []
        return values if per_step else (values[0] if values else b"")
    if spec.encoding in ("zlib", "bytes"):
        # tfds tensor encodings store each element's raw array bytes (zlib-compressed if asked)
        dtype = np.dtype(spec.dtype)
        values = list(feature.bytes_list.value) if kind == "bytes_list" else []
        arrays = [
            np.frombuffer(zlib.decompress(v) if spec.encoding == "zlib" else v, dtype).reshape(spec.shape)
            for v in values
        ]
        stacked = np.stack(arrays) if arrays else np.zeros((0, *spec.shape), dtype)
        return stacked if per_step else (stacked[0] if len(stacked) else None)
    if kind == "float_list":
        arr = np.asarray(feature.float_list.value, dtype=np.float32)
    elif kind == "int64_list":
        arr = np.asarray(feature.int64_list.value, dtype=np.int64)
    else:
        arr = np.zeros((0,), np.float32)
    arr = arr.astype(np.dtype(spec.dtype), copy=False)
    if per_step:
        return arr.reshape(-1, *spec.shape)
    return arr.reshape(spec.shape) if spec.shape else (arr[0] if arr.size else None)


def parse_episode(
    payload: bytes, leaves: Mapping[str, LeafSpec], step_keys: list[str], episode_keys: list[str] = ()
) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Parse one serialized RLDS episode; returns (step features, episode features, number of steps).

    Only the requested keys are decoded; images come back as their stored (encoded) bytes.
    """
    ex = parse_example_proto(payload)
    fmap = ex.features.feature
    steps: dict[str, Any] = {}
    for key in step_keys:
        flat = f"steps/{key}"
        if flat not in leaves:
            raise KeyError(f"the dataset has no step feature {key!r}")
        steps[key] = _decode_leaf(leaves[flat], fmap[flat], per_step=True) if flat in fmap else None
    meta = {k: _decode_leaf(leaves[k], fmap[k], per_step=False) for k in episode_keys if k in leaves and k in fmap}
    length = _episode_length(fmap, leaves)
    for key, value in steps.items():
        if value is None:
            steps[key] = [] if leaves[f"steps/{key}"].kind in ("image", "text") else np.zeros((0,))
        if len(steps[key]) != length:
            raise ValueError(f"step feature {key!r} has {len(steps[key])} entries, episode has {length} steps")
    return steps, meta, length


def _episode_length(fmap: Any, leaves: Mapping[str, LeafSpec]) -> int:
    # is_first exists in every RLDS dataset; fall back to any scalar step tensor
    for key in ("steps/is_first", "steps/is_last", *sorted(leaves)):
        spec = leaves.get(key)
        if spec is None or not key.startswith("steps/"):
            continue
        if key not in fmap:
            if key == "steps/is_first":
                return 0
            continue
        f = fmap[key]
        kind = f.WhichOneof("kind")
        if kind is None:
            return 0
        n = len(getattr(f, kind).value)
        if spec.kind in ("image", "text") or spec.dtype == "object" or spec.encoding != "none":
            return n
        width = int(np.prod(spec.shape)) if spec.shape else 1
        return n // width if width else 0
    return 0
