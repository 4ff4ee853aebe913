"""Continuous robot actions <-> dedicated action tokens (docs/DESIGN.md 2.3).

256 new tokens `<ACTION_0>`..`<ACTION_255>` are added to the Qwen2 tokenizer (they fit in the spare
embedding rows). Values in [-1, 1] fall into 256 equal intervals; +1 goes to the last; decoding
returns the interval centre. OpenVLA instead reuses the last 256 vocabulary ids; with Qwen's BPE many
7-token strings of those do not survive decode->encode, so dedicated tokens are used here.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_tools.converted_format import PROMPT_TEMPLATE as DEFAULT_INSTRUCTION_PROMPT
from data_tools.atomic import write_text

CONFIG_NAME = "vla_action_tokenizer.json"


@dataclass
class ActionTokenizer:
    n_bins: int = 256
    low: float = -1.0
    high: float = 1.0
    action_dim: int = 7
    token_format: str = "<ACTION_{}>"
    # Filled once the tokens are in a tokenizer; contiguous by construction (checked).
    first_token_id: int | None = None
    prompt: str = DEFAULT_INSTRUCTION_PROMPT
    conv_template: str = "qwen_1_5"
    system_message: str = "You are a helpful assistant."
    normalization: str = "bounds_q99"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_bins < 2 or not self.high > self.low:
            raise ValueError(f"invalid action bins: n_bins={self.n_bins}, range=[{self.low}, {self.high}]")

    # ---- tokens --------------------------------------------------------------------------------
    @property
    def tokens(self) -> list[str]:
        return [self.token_format.format(i) for i in range(self.n_bins)]

    @property
    def token_ids(self) -> np.ndarray:
        if self.first_token_id is None:
            raise RuntimeError("action tokens are not bound to a tokenizer yet: call add_to_tokenizer(tokenizer)")
        return np.arange(self.first_token_id, self.first_token_id + self.n_bins, dtype=np.int64)

    def add_to_tokenizer(self, tokenizer) -> int:
        """Add the action tokens (idempotent); bind their ids. Returns how many were new."""
        tokens = self.tokens
        vocab = tokenizer.get_vocab()
        missing = [t for t in tokens if t not in vocab]
        added = tokenizer.add_tokens(missing, special_tokens=True) if missing else 0
        ids = tokenizer.convert_tokens_to_ids(tokens)
        if ids != list(range(ids[0], ids[0] + self.n_bins)):
            raise ValueError(f"action tokens are not contiguous in the tokenizer (first ids {ids[:3]}...): "
                             "the tokenizer already holds some <ACTION_i> tokens out of order")
        self.first_token_id = int(ids[0])
        return added

    # ---- values <-> bins -----------------------------------------------------------------------
    @property
    def bin_width(self) -> float:
        return (self.high - self.low) / self.n_bins

    @property
    def bin_centers(self) -> np.ndarray:
        return self.low + (np.arange(self.n_bins) + 0.5) * self.bin_width

    def encode(self, actions) -> np.ndarray:
        """Values -> bin indices, any shape. Out-of-range values are clipped to [low, high]; NaN/inf refused."""
        a = np.asarray(actions, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"non-finite action values cannot be tokenized: {a[~np.isfinite(a)][:5].tolist()}")
        a = np.clip(a, self.low, self.high)
        bins = np.floor((a - self.low) / self.bin_width).astype(np.int64)
        return np.minimum(bins, self.n_bins - 1)  # +1 sits on the last interval's closed end

    def decode(self, bins) -> np.ndarray:
        b = np.asarray(bins, dtype=np.int64)
        if b.size and (b.min() < 0 or b.max() >= self.n_bins):
            raise ValueError(f"action bins must lie in [0, {self.n_bins}), got {b.min()}..{b.max()}")
        return self.bin_centers[b]

    def encode_to_ids(self, actions) -> np.ndarray:
        return self.encode(actions) + self.token_ids[0]

    def ids_to_bins(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        bins = ids - self.token_ids[0]
        if ids.size and (bins.min() < 0 or bins.max() >= self.n_bins):
            bad = ids[(bins < 0) | (bins >= self.n_bins)]
            raise ValueError(f"token ids {bad[:7].tolist()} are not action tokens "
                             f"(those are {self.token_ids[0]}..{self.token_ids[-1]})")
        return bins

    def decode_ids(self, ids) -> np.ndarray:
        return self.decode(self.ids_to_bins(ids))

    def is_action_id(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids >= self.token_ids[0]) & (ids <= self.token_ids[-1])

    # ---- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens"] = self.tokens
        d["token_ids"] = self.token_ids.tolist() if self.first_token_id is not None else None
        return d

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "ActionTokenizer":
        path = Path(directory)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: this checkpoint was not written by llava_vla_plugin "
                                    "(or the file was removed); copy vla_action_tokenizer.json from the run's output dir")
        d = json.loads(path.read_text())
        d.pop("tokens", None)
        token_ids = d.pop("token_ids", None)
        tok = cls(**d)
        if token_ids is not None and tok.first_token_id is not None and token_ids[0] != tok.first_token_id:
            raise ValueError(f"{path}: token_ids and first_token_id disagree")
        return tok
