"""Process-wide VLA state shared by the hooks: one action tokenizer, the data's statistics.

The hooks run at different points of upstream's train() (tokenizer set-up, dataset, trainer) and
upstream passes nothing of ours between them; this module is the hand-off. DataLoader workers
inherit it when they fork.
"""
from __future__ import annotations

from llava_vla_plugin.action_tokenizer import ActionTokenizer

_action_tokenizer: ActionTokenizer | None = None
_dataset_statistics: dict = {}


def get_action_tokenizer() -> ActionTokenizer:
    global _action_tokenizer
    if _action_tokenizer is None:
        _action_tokenizer = ActionTokenizer()
    return _action_tokenizer


def set_action_tokenizer(tok: ActionTokenizer) -> None:
    global _action_tokenizer
    _action_tokenizer = tok


def set_dataset_statistics(stats: dict) -> None:
    global _dataset_statistics
    _dataset_statistics = dict(stats)


def get_dataset_statistics() -> dict:
    return _dataset_statistics

# Targets of the labelled positions (aligned with the logits the training forward returns):
# the trainer's action metrics need them and only the model's forward knows them.
_targets = None


def stash_targets(targets) -> None:
    global _targets
    _targets = targets


def pop_targets():
    global _targets
    targets, _targets = _targets, None
    return targets


# Sequence positions (visual + text) processed in training, for tokens/compute scaling axes.
_tokens = {"tokens": 0, "samples": 0}


def count_tokens(tokens: int, samples: int) -> None:
    _tokens["tokens"] += tokens
    _tokens["samples"] += samples


def take_token_count() -> int:
    """Tokens counted since the last call (the trainer sums them across ranks each step)."""
    tokens, _tokens["tokens"], _tokens["samples"] = _tokens["tokens"], 0, 0
    return tokens


def tokens_per_sample() -> float | None:
    return _tokens["tokens"] / _tokens["samples"] if _tokens["samples"] else None
