"""Constrained decoding at the cost of the rows it allows (issue 23 item 2).

Generation under the pipeline's constraint (pipeline.ActionConstraint) may only pick the representation's
ids and the end token: 257 of Qwen2's 151,936 rows for `bins` / `bins_chunk`, the FAST tokens plus the end
for `fast`. The model's LM head still multiplies every decode step's hidden state by all 151,936 rows (for
0.5B: 896 x 151,936 = 136M multiply-adds a token, about a quarter of a decode step's FLOPs), and the
constraint then throws all but the allowed columns away.

`restricted_lm_head(model, allowed)` swaps the head for the duration of one generate() call: a module that
computes `F.linear(hidden, W[allowed], b[allowed])` and writes those columns into a full-width row of -inf.
The constraint sets every other column to -inf anyway, so greedy generation picks the same ids. Each
allowed logit is the same dot product as in the full head; whether a BLAS kernel for 257 rows sums it in
the same order as the one for 151,936 rows is the library's business, so the tests compare the actions (the
argmax), which must be identical, and report the largest logit difference.

Where the two can differ: a near-tie. Two allowed logits within the kernels' rounding of each other (exact ties
among rows still at their initial vocabulary mean in an untrained model; in bf16, values one bf16 step apart)
may be ordered differently by the two matmuls. Measured: fp32 trained checkpoints give identical ids on every
test here (tests/test_policy.py, the quality runs of tests/test_action_chunks.py); the untrained tiny model,
whose 256 action rows are all the same mean vector, broke its all-way tie at a different bin. Such a pick is
noise in either head; `VLAPolicy(restrict_head=False)` (from_pretrained(..., restrict_head=False)) reproduces
the full head's exactly.

Only a plain `torch.nn.Linear` head is swapped: a head wrapped by an unmerged LoRA adapter (or anything
else) is left alone and decoded with the full head (`restricted_lm_head` returns False), never approximated.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F


class RestrictedHead(torch.nn.Module):
    """The LM head's `allowed` rows only; the other columns of its output are -inf."""

    def __init__(self, full: torch.nn.Linear, allowed: torch.Tensor):
        super().__init__()
        self.out_features = full.out_features
        self.allowed = allowed.to(full.weight.device)
        self.weight = full.weight.detach()[self.allowed]  # [n_allowed, hidden], a small copy per generate() call
        self.bias = None if full.bias is None else full.bias.detach()[self.allowed]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        sub = F.linear(hidden, self.weight, self.bias)
        out = sub.new_full((*sub.shape[:-1], self.out_features), float("-inf"))
        out[..., self.allowed] = sub
        return out


def head_owner(model):
    """The module whose `lm_head` attribute generate() calls, if that head is a plain Linear; else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "lm_head", None)
    return base if type(head) is torch.nn.Linear else None


@contextmanager
def restricted_lm_head(model, allowed: Sequence[int]) -> Iterator[bool]:
    """Within the block the model's LM head computes only `allowed` rows (module docstring). Yields whether it
    was swapped; the original head is back afterwards, also after an exception."""
    owner = head_owner(model)
    if owner is None:
        yield False
        return
    full = owner.lm_head
    ids = torch.as_tensor(sorted(set(int(i) for i in allowed)), dtype=torch.long)
    if len(ids) == 0 or int(ids[0]) < 0 or int(ids[-1]) >= full.out_features:
        raise ValueError(f"allowed ids {ids[:3].tolist()}...{ids[-3:].tolist()} are not rows of the LM head "
                         f"({full.out_features} rows)")
    # nn.Module.__setattr__ registers the swap as a submodule; restored below
    owner.lm_head = RestrictedHead(full, ids)
    try:
        yield True
    finally:
        owner.lm_head = full
