"""FAST action tokens (Pertsch et al. 2025, "FAST: Efficient Action Tokenization for VLAs"): a normalized
action chunk [H, D] -> a short sequence of BPE token indices and back. The pure core of the `fast` action
representation (issue 23); no model, no upstream import (numpy + the `tokenizers` library).

The rule is the reference processor's, `physical-intelligence/fast` on the Hugging Face hub,
`processing_action_tokenizer.py` (class UniversalActionProcessor; line numbers below are that file's, 161
lines, 6,145 bytes), as openpi uses it (`src/openpi/models/tokenizer.py`, FASTTokenizer, commit 15a9616):

1. DCT-II, orthonormal, over the H steps of each action dimension (`dct(a, axis=0, norm="ortho")`, :109;
   :52 in `__call__`). Orthonormal means the inverse is the transpose and errors keep their L2 size.
2. Multiply by `scale` (10 by default, :20) and round half to even (`np.around`, :53 / :112).
3. Flatten the [H, D] coefficient matrix row-major, i.e. frequency-major: all D dimensions' DC terms first,
   then the first harmonic of each, ... (`elem.flatten()`, :56). Smooth chunks end in long runs of zeros,
   which is what BPE compresses.
4. Shift by `min_token` (the smallest quantized coefficient of the fit data, :113) and map each integer to
   the character `chr(k)` (:56 / :129), so a chunk is a string over the alphabet chr(0)..chr(max-min).
5. BPE over those strings, fitted with the `tokenizers` library exactly as the reference configures it
   (:134-148): a BPE model under a ByteLevel pre-tokenizer / decoder / post-processor (what
   `ByteLevelBPETokenizer()` sets up), `BpeTrainer(vocab_size, min_frequency=2, special_tokens=[],
   initial_alphabet=[chr(0)..chr(max-min)], max_token_length=10000)`. The ByteLevel stage is part of the
   reference's rule (it splits the coefficient string at GPT-2's character classes and remaps control
   characters), so it is kept: our fitted tokenizer serializes to the same bytes as the reference's on the
   same data (tests/test_fast_codec.py pins the sha256 the reference printed).
6. Decoding inverts 2-4: BPE decode -> `ord` -> + min_token -> reshape [H, D] -> / scale -> inverse DCT.

Where this module deliberately differs from the reference (each shown against the reference's own output
in tests/test_fast_codec.py):

* Invalid sequences. The reference's rule (:80-95) is: if the decoded coefficients are not exactly H x D,
  the chunk is all zeros (the inverse DCT of zeros), with a printed error; openpi's `extract_actions`
  (tokenizer.py:119-134) returns zeros too when no action span is found. We keep that result -- zeros
  [H, D] -- and return it as `DecodeResult(ok=False, reason=...)` instead of printing, never raising, so a
  caller counts them. We also call two cases invalid that the reference decodes silently: a token index
  outside the vocabulary (the reference's BPE decode skips it, so `valid + [5000]` decodes as `valid`), and
  a decoded character outside the alphabet (a broken UTF-8 sequence becomes U+FFFD, which the reference
  turns into a coefficient of 65533 + min_token).
* Out-of-range coefficients at encode time. The reference clamps below at min_token
  (`np.maximum(... - min_token, 0)`, :56) but not above: a coefficient above the fit's max becomes a
  character outside the alphabet, which BPE (no unk token) drops, so the sequence no longer decodes (the
  all-ones chunk with the pinned vocabulary: 3 tokens, 49 coefficients, decoded as zeros). We clip both
  ends to [min_token, max_token]; `encode_report` says how many coefficients were clipped.
* The DCT is computed here in float64 with an explicit orthonormal matrix (no scipy dependency); scipy's
  `dct` keeps float32 input in float32. The integer coefficients equal scipy's on the pinned windows and on
  random ones (tests).
* The fitted vocabulary size is the trainer's (it stops merging when pairs occur fewer than twice), which can
  be below `vocab_size`; `n_tokens` is that size, and `token_strings()` names exactly that many LM tokens.

Quantization bound (why a round trip is close): the DCT is orthonormal, so with every coefficient inside
[min_token, max_token] the only error is rounding, at most 0.5/scale per coefficient. Per action dimension
the error vector e = C^T r (r the rounding errors, |r_k| <= 0.5/scale) has ||e||_2 = ||r||_2 <= sqrt(H) *
0.5 / scale, and each step's error |e_n| = |sum_k C[k, n] r_k| <= 0.5/scale * max_n sum_k |C[k, n]|, which is
<= sqrt(H) * 0.5/scale by Cauchy-Schwarz (each column of C has unit norm). H = 8, scale 10: L2 <= 0.1414
per dimension, max abs <= 0.1321 (`round_trip_bound`). One `<ACTION_k>` bin is 2/256 = 0.0078 wide: FAST at
scale 10 is coarser per value and much shorter per chunk; scale is the knob.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.atomic import write_text

log = logging.getLogger(__name__)

FILE_NAME = "vla_fast_tokenizer.json"
FORMAT_NAME = "vla_fast_tokenizer"
FORMAT_VERSION = 1
TOKEN_FORMAT = "<FAST_{}>"
DEFAULT_SCALE = 10.0       # processing_action_tokenizer.py:20
DEFAULT_VOCAB_SIZE = 1024  # processing_action_tokenizer.py:21; the FAST paper's vocabulary
MIN_FREQUENCY = 2          # processing_action_tokenizer.py:140
MAX_TOKEN_LENGTH = 10000   # processing_action_tokenizer.py:144
RANGE_TOLERANCE = 1e-6     # normalized actions are clipped to [-1, 1] by the converter; float32 slack only


class FastCodecError(ValueError):
    """Bad input to fit / encode / load (the message says what and what to do)."""


# ---- the DCT (orthonormal DCT-II along axis 0) -----------------------------------------------------------
def dct_matrix(n: int) -> np.ndarray:
    """C [n, n] with C[k, m] = s_k cos(pi (2m + 1) k / (2n)), s_0 = sqrt(1/n), s_k = sqrt(2/n): scipy's
    `dct(x, type=2, norm="ortho")` along an axis is C @ x, and C is orthogonal (the inverse is C.T)."""
    if n < 1:
        raise FastCodecError(f"the DCT length must be >= 1, got {n}")
    k = np.arange(n)[:, None]
    m = np.arange(n)[None, :]
    c = np.cos(np.pi * (2 * m + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c


def dct_ortho(x: np.ndarray) -> np.ndarray:
    """DCT-II (orthonormal) over axis 0 of [H, D], float64."""
    x = np.asarray(x, dtype=np.float64)
    return dct_matrix(x.shape[0]) @ x


def idct_ortho(coeff: np.ndarray) -> np.ndarray:
    """The inverse of `dct_ortho` (DCT-III, orthonormal) over axis 0, float64."""
    coeff = np.asarray(coeff, dtype=np.float64)
    return dct_matrix(coeff.shape[0]).T @ coeff


def quantize(window: np.ndarray, scale: float) -> np.ndarray:
    """The integer DCT coefficients [H, D] of a window: round(dct * scale), half to even (np.around, as the
    reference, processing_action_tokenizer.py:53), before any min_token shift or clipping."""
    return np.rint(dct_ortho(window) * float(scale)).astype(np.int64)


@dataclass(frozen=True)
class RoundTripBound:
    """Worst-case error of encode -> decode for a window whose coefficients are inside the alphabet
    (normalized units; the derivation is in the module docstring)."""

    max_abs: float          # any single value
    l2_per_dim: float       # the error vector of one action dimension over the H steps


def round_trip_bound(horizon: int, scale: float) -> RoundTripBound:
    c = dct_matrix(horizon)
    half = 0.5 / float(scale)
    return RoundTripBound(max_abs=float(half * np.abs(c).sum(axis=0).max()), l2_per_dim=math.sqrt(horizon) * half)


# ---- configuration and results ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FastConfig:
    """Everything besides the BPE merges that decoding needs; saved in `vla_fast_tokenizer.json`."""

    horizon: int             # H: steps per chunk
    action_dim: int          # D
    min_token: int           # smallest quantized coefficient of the fit data (the shift; reference :113)
    max_token: int           # largest one: the alphabet is chr(0)..chr(max_token - min_token)
    n_tokens: int            # the fitted BPE vocabulary's size (<= vocab_size)
    scale: float = DEFAULT_SCALE
    vocab_size: int = DEFAULT_VOCAB_SIZE  # requested bound on the BPE vocabulary
    token_format: str = TOKEN_FORMAT
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.horizon < 1 or self.action_dim < 1:
            raise FastCodecError(f"horizon and action_dim must be >= 1 (got H={self.horizon}, D={self.action_dim})")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise FastCodecError(f"scale must be a positive number, got {self.scale}")
        if self.max_token < self.min_token:
            raise FastCodecError(f"max_token {self.max_token} < min_token {self.min_token}")
        if not 1 <= self.n_tokens <= self.vocab_size:
            raise FastCodecError(f"n_tokens {self.n_tokens} must lie in [1, vocab_size={self.vocab_size}]")
        if self.token_format.format(0) == self.token_format.format(1):
            raise FastCodecError(f"token_format {self.token_format!r} must contain {{}} for the index")

    @property
    def alphabet_size(self) -> int:
        """The number of integer levels ("bins") a coefficient can take."""
        return self.max_token - self.min_token + 1


@dataclass(frozen=True)
class DecodeResult:
    """A decoded chunk. An invalid sequence gives zeros [H, D] (the reference's rule) with ok=False and why."""

    actions: np.ndarray      # [H, D] float32, normalized
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class EncodeReport:
    tokens: list[int]
    clipped: int             # coefficients outside [min_token, max_token] that were clipped (0: within the bound)


# ---- the codec -------------------------------------------------------------------------------------------
def _new_bpe():
    """An untrained BPE tokenizer set up as `tokenizers.ByteLevelBPETokenizer()` (the reference's, :134)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _check_window(window, index: int | str, shape: tuple[int, int] | None = None) -> np.ndarray:
    w = np.asarray(window, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
        raise FastCodecError(f"window {index}: expected a 2-d array [H, D], got shape {w.shape}")
    if shape is not None and w.shape != shape:
        raise FastCodecError(f"window {index}: shape {w.shape} differs from the codec's (H, D) = {shape}")
    if not np.all(np.isfinite(w)):
        raise FastCodecError(f"window {index}: non-finite values cannot be tokenized")
    if np.abs(w).max() > 1.0 + RANGE_TOLERANCE:
        raise FastCodecError(f"window {index}: values up to {np.abs(w).max():.4g} are not normalized actions in "
                             "[-1, 1]; normalize first (data_tools.normalize, as the converter does)")
    return w


class FastCodec:
    """A fitted FAST tokenizer: `FastCodec.fit(windows)`, `encode`, `decode`, `save` / `load`."""

    def __init__(self, config: FastConfig, bpe_json: str, fit_info: dict[str, Any] | None = None):
        from tokenizers import Tokenizer

        self.config = config
        self._bpe = Tokenizer.from_str(bpe_json)
        self._bpe_json = self._bpe.to_str()  # tokenizers' own serialization: the same bytes however it was read
        self.fit_info: dict[str, Any] = dict(fit_info or {})
        if self._bpe.get_vocab_size() != config.n_tokens:
            raise FastCodecError(f"the BPE vocabulary has {self._bpe.get_vocab_size()} tokens, the config says "
                                 f"n_tokens={config.n_tokens}")

    # ---- fitting -------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, windows: Sequence[np.ndarray] | Iterable[np.ndarray], vocab_size: int = DEFAULT_VOCAB_SIZE,
            scale: float = DEFAULT_SCALE, *, seed: int = 0, max_windows: int | None = None,
            show_progress: bool = False) -> "FastCodec":
        """Fit the BPE vocabulary on normalized windows [H, D] (all the same shape, values in [-1, 1]).

        Deterministic: the same windows, options and seed give a byte-identical saved file. `seed` only picks
        which windows are used when `max_windows` is below their number (a seeded subset, in input order);
        the BPE trainer itself has no randomness. Raises FastCodecError (naming the window) on bad input, and
        when the coefficient range needs more than `vocab_size` characters (the reference's assert, :116-118;
        increase vocab_size or lower scale).
        """
        from tokenizers import trainers

        if vocab_size < 2:
            raise FastCodecError(f"vocab_size must be >= 2, got {vocab_size}")
        if not (scale > 0 and math.isfinite(scale)):
            raise FastCodecError(f"scale must be a positive number, got {scale}")
        windows = list(windows)
        if not windows:
            raise FastCodecError("no windows to fit the FAST tokenizer on")
        n_windows = len(windows)
        if max_windows is not None and max_windows < n_windows:
            if max_windows < 1:
                raise FastCodecError(f"max_windows must be >= 1, got {max_windows}")
            keep = np.sort(np.random.default_rng(seed).permutation(n_windows)[:max_windows])
            windows = [windows[i] for i in keep]
        first = _check_window(windows[0], 0)
        shape = first.shape
        coeffs = np.stack([quantize(_check_window(w, i, shape), scale).reshape(-1) for i, w in enumerate(windows)])
        min_token, max_token = int(coeffs.min()), int(coeffs.max())
        alphabet_size = max_token - min_token + 1
        if max_token - min_token > vocab_size:  # the reference's condition (:116-118)
            raise FastCodecError(f"vocab_size {vocab_size} is too small for the coefficient range "
                                 f"[{min_token}, {max_token}] at scale {scale}: increase vocab_size or lower scale")
        if max_token - min_token + 100 > vocab_size:  # the reference's warning (:119-123)
            log.warning("the coefficient alphabet (%d levels) is almost as large as vocab_size %d: few BPE merges "
                        "fit; consider a larger vocab_size", alphabet_size, vocab_size)
        shifted = coeffs - min_token
        alphabet = [chr(i) for i in range(alphabet_size)]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=MIN_FREQUENCY, show_progress=show_progress,
                                      special_tokens=[], initial_alphabet=alphabet, max_token_length=MAX_TOKEN_LENGTH)
        bpe = _new_bpe()
        bpe.train_from_iterator(("".join(map(chr, row)) for row in shifted.tolist()), trainer=trainer,
                                length=len(shifted))
        n_tokens = bpe.get_vocab_size()
        if n_tokens > vocab_size:
            raise FastCodecError(f"the fitted vocabulary has {n_tokens} tokens, more than vocab_size {vocab_size} "
                                 "(the alphabet alone is that large): increase vocab_size or lower scale")
        config = FastConfig(horizon=shape[0], action_dim=shape[1], min_token=min_token, max_token=max_token,
                            n_tokens=n_tokens, scale=float(scale), vocab_size=int(vocab_size))
        info = {"windows": n_windows, "windows_used": len(windows), "seed": int(seed),
                "max_windows": max_windows, "min_frequency": MIN_FREQUENCY}
        return cls(config, bpe.to_str(), info)

    # ---- encode / decode -----------------------------------------------------------------------------------
    @property
    def bpe_json(self) -> str:
        """The BPE tokenizer as `tokenizers` serializes it (equal to the reference's `to_str()` on the same data)."""
        return self._bpe_json

    @property
    def n_tokens(self) -> int:
        return self.config.n_tokens

    def coefficients(self, window: np.ndarray) -> np.ndarray:
        """The window's integer DCT coefficients [H, D] (quantized, not shifted or clipped)."""
        c = self.config
        return quantize(_check_window(window, "to encode", (c.horizon, c.action_dim)), c.scale)

    def encode_report(self, window: np.ndarray) -> EncodeReport:
        """`encode`, plus how many coefficients fell outside the fitted range and were clipped."""
        c = self.config
        q = self.coefficients(window).reshape(-1)
        clipped = int(np.count_nonzero((q < c.min_token) | (q > c.max_token)))
        shifted = np.clip(q, c.min_token, c.max_token) - c.min_token
        ids = self._bpe.encode("".join(map(chr, shifted.tolist()))).ids
        return EncodeReport(tokens=[int(i) for i in ids], clipped=clipped)

    def encode(self, window: np.ndarray) -> list[int]:
        """A normalized window [H, D] -> token indices in [0, n_tokens)."""
        return self.encode_report(window).tokens

    def decode(self, tokens: Sequence[int] | np.ndarray, horizon: int | None = None,
               action_dim: int | None = None) -> DecodeResult:
        """Token indices -> DecodeResult(actions [H, D] float32, ok, reason). Never raises on the tokens: an
        invalid sequence (index outside the vocabulary, a coefficient count other than H x D, a character
        outside the alphabet, anything the BPE decoder refuses) gives zeros [H, D] and ok=False (the
        reference's rule, processing_action_tokenizer.py:91-95). H and D default to the fitted ones."""
        c = self.config
        h = c.horizon if horizon is None else int(horizon)
        d = c.action_dim if action_dim is None else int(action_dim)
        if h < 1 or d < 1:
            raise FastCodecError(f"horizon and action_dim must be >= 1 (got {h}, {d})")

        def invalid(reason: str) -> DecodeResult:
            return DecodeResult(np.zeros((h, d), dtype=np.float32), False, reason)

        try:
            raw = np.asarray(tokens, dtype=object).reshape(-1).tolist()
            ids = [int(t) for t in raw]
            if any(i != t for i, t in zip(ids, raw)):  # 3.7 or "5" are not token indices
                raise ValueError(f"{next(t for i, t in zip(ids, raw) if i != t)!r}")
        except (TypeError, ValueError, OverflowError) as e:
            return invalid(f"tokens are not integers ({e})")
        bad = [t for t in ids if not 0 <= t < c.n_tokens]
        if bad:
            return invalid(f"token index {bad[0]} outside the vocabulary [0, {c.n_tokens})")
        try:
            text = self._bpe.decode(ids, skip_special_tokens=False)
        except Exception as e:  # the BPE decoder's own refusal: a defined result, as the reference (:91)
            return invalid(f"BPE decode failed: {e}")
        if len(text) != h * d:
            return invalid(f"{len(text)} coefficients decoded, expected H x D = {h} x {d} = {h * d}")
        codes = np.fromiter((ord(ch) for ch in text), dtype=np.int64, count=len(text))
        outside = codes >= c.alphabet_size
        if outside.any():
            return invalid(f"decoded character U+{int(codes[outside][0]):04X} is outside the alphabet "
                           f"(0..{c.alphabet_size - 1})")
        coeff = (codes + c.min_token).reshape(h, d).astype(np.float64) / c.scale
        return DecodeResult(idct_ortho(coeff).astype(np.float32), True, "")

    # ---- LM tokens -----------------------------------------------------------------------------------------
    def token_strings(self) -> list[str]:
        """The dedicated tokens a language model adds for this vocabulary: `<FAST_0>`..`<FAST_{n_tokens-1}>`,
        index i <-> BPE id i (as `<ACTION_k>` for bins; never the LM's own ids)."""
        return [self.config.token_format.format(i) for i in range(self.config.n_tokens)]

    # ---- persistence ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, **asdict(self.config), "alphabet_size": self.config.alphabet_size,
                "fit": self.fit_info, "bpe": json.loads(self._bpe_json)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "the FAST tokenizer dict") -> "FastCodec":
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise FastCodecError(f"{source} is not a {FORMAT_NAME} file (its `format` is "
                                 f"{d.get('format') if isinstance(d, dict) else None!r}); fit one with "
                                 "python -m llava_vla_plugin.train.fit_fast")
        if d.get("version") != FORMAT_VERSION:
            raise FastCodecError(f"{source} has format version {d.get('version')!r}; this llava_vla_plugin reads "
                                 f"version {FORMAT_VERSION} (refit it, or use the version that wrote it)")
        names = [f.name for f in fields(FastConfig)]
        missing = [f.name for f in fields(FastConfig) if f.default is MISSING and f.name not in d]
        missing += [] if "bpe" in d else ["bpe"]
        if missing:
            raise FastCodecError(f"{source} lacks {', '.join(missing)}: refit it")
        config = FastConfig(**{k: d[k] for k in names if k in d})
        try:
            return cls(config, json.dumps(d["bpe"], ensure_ascii=False), d.get("fit"))
        except Exception as e:
            if isinstance(e, FastCodecError):
                raise FastCodecError(f"{source}: {e}") from None
            raise FastCodecError(f"{source}: its `bpe` tokenizer does not load ({e}); refit it") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=True) + "\n"

    def save(self, directory: str | Path) -> Path:
        """Write `directory/vla_fast_tokenizer.json` atomically (data_tools.atomic); returns its path."""
        path = Path(directory) / FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "FastCodec":
        """Read a codec from a directory holding vla_fast_tokenizer.json, or from that file's path."""
        path = Path(directory)
        if path.is_dir():
            path = path / FILE_NAME
        if not path.is_file():
            raise FastCodecError(f"{path} not found: fit a FAST tokenizer with python -m "
                                 "llava_vla_plugin.train.fit_fast --data_path MIXTURE.yaml --out DIR")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise FastCodecError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); refit it") from None
        return cls.from_dict(d, str(path))
