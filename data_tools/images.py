"""Frame images: copy stored JPEG bytes untouched; decode and encode once only where pixels must change."""

from __future__ import annotations

import io

import numpy as np

JPEG_QUALITY = 95
_JPEG_SOI = b"\xff\xd8\xff"


class ImageDecodeError(ValueError):
    """The stored image could not be decoded where decoding was needed."""


class MissingImageError(ImageDecodeError):
    """The step stores no image (empty bytes: the camera did not record)."""


def encode_jpeg(pixels: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """Raw RGB pixels (H, W, 3 uint8) as one JPEG (PIL, the same encoder for every tool)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


_encode_jpeg = encode_jpeg


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


# Markers that stand alone (no length field): TEM, RST0-7, SOI, EOI.
_STANDALONE = {0x01, *range(0xD0, 0xD8), 0xD8, 0xD9}


def jpeg_structure_problem(data: bytes) -> str | None:
    """None if `data` is a structurally complete JPEG, else what is wrong with it.

    Walks the marker segments from SOI, skips each scan's entropy-coded data (stuffed 0xFF00 bytes and
    RSTn markers belong to it) and requires EOI as the last two bytes. This catches what a copy without
    decoding would otherwise pass on: truncated files (no EOI), a valid header followed by zeros (the scan
    never reaches EOI), and bytes after EOI. It does not decode, so a file whose compressed data is
    damaged but well-framed passes; `verify_decodes` is the full check. Cost: see BENCHMARKS.md.
    """
    n = len(data)
    if data[:2] != b"\xff\xd8":
        return "no JPEG start-of-image marker"
    pos = 2
    find = data.find
    while True:
        if pos + 2 > n:
            return f"truncated: ends at byte {n} inside the marker segments, before end-of-image"
        if data[pos] != 0xFF:
            return f"byte {pos}: expected a marker, found 0x{data[pos]:02x}"
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:
            if pos + 2 != n:
                return f"{n - pos - 2} bytes after the end-of-image marker"
            return None
        if marker in _STANDALONE:
            pos += 2
            continue
        if pos + 4 > n:
            return f"truncated: ends at byte {n} inside a segment header"
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2:
            return f"byte {pos}: invalid segment length {length}"
        pos += 2 + length
        if pos > n:
            return f"truncated: segment 0xff{marker:02x} runs past the end of the file ({n} bytes)"
        if marker != 0xDA:  # not start-of-scan: the next segment follows directly
            continue
        while True:  # entropy-coded data: runs to the first 0xFF not followed by 0x00 or RSTn
            pos = find(b"\xff", pos)
            if pos < 0 or pos + 1 >= n:
                return "truncated: the scan data has no end-of-image marker"
            nxt = data[pos + 1]
            if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
                pos += 1 if nxt == 0xFF else 2
                continue
            break


def verify_decodes(data: bytes) -> str | None:
    """None if PIL decodes every pixel of `data`, else the decoder's complaint (the --verify-images check)."""
    try:
        _decode_rgb(data)
    except ImageDecodeError as e:
        return str(e)
    return None
