"""Frame images: copy stored JPEG bytes untouched; decode and encode once only where pixels must change."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

JPEG_QUALITY = 95
_JPEG_SOI = b"\xff\xd8\xff"


class ImageDecodeError(ValueError):
    """The stored image could not be decoded where decoding was needed."""


class MissingImageError(ImageDecodeError):
    """The step stores no image (empty bytes: the camera did not record)."""


def _encode_jpeg(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _decode_rgb(data: bytes) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises several types for bad data
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): {e}") from e


def is_jpeg(data: bytes) -> bool:
    return data[:3] == _JPEG_SOI


def frame_jpeg(stored: bytes | np.ndarray, flip_channels: bool) -> tuple[bytes, str]:
    """Return (JPEG bytes, how) for one stored frame; how is 'copied', 'flipped' or 'encoded'.

    A stored JPEG with no channel fix is returned as is (bit-exact, never decoded), because TF's and PIL's
    decoders differ by a few levels and a decode/encode round trip only loses quality and time.
    """
    if isinstance(stored, np.ndarray):  # raw pixels stored as a tensor
        pixels = stored if stored.ndim == 3 else stored[..., None].repeat(3, -1)
        pixels = pixels.astype(np.uint8, copy=False)
        return _encode_jpeg(pixels[..., ::-1] if flip_channels else pixels), "encoded"
    if not stored:
        raise MissingImageError("empty image (padding)")
    if flip_channels:
        # the source recorded BGR as RGB: swap back (OpenVLA's RLDS mod scripts do this at prep time)
        return _encode_jpeg(np.ascontiguousarray(_decode_rgb(stored)[..., ::-1])), "flipped"
    if is_jpeg(stored):
        return bytes(stored), "copied"
    return _encode_jpeg(_decode_rgb(stored)), "encoded"


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name and rename, so a killed run never leaves a truncated file under `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
