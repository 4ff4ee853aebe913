"""DeepSpeed ZeRO-3 helpers shared by training-time code that edits parameters (the action-token rows, the
parallel_l1 slot row). Under ZeRO-3 each rank holds a shard of a parameter; a module that writes rows must
gather the whole tensor, modify it on rank 0 and let DeepSpeed re-partition it. Without DeepSpeed (or
under ZeRO-1/2, where parameters are whole) this is a no-op. DeepSpeed is imported only when needed.
"""
from __future__ import annotations


class gathered:
    """`with gathered(params):` the full tensors of `params`, writable on rank 0 (deepspeed.zero.GatheredParameters)."""

    def __init__(self, params):
        self.params = params
        self.ctx = None

    def __enter__(self):
        if any(hasattr(p, "ds_id") for p in self.params):
            import deepspeed

            self.ctx = deepspeed.zero.GatheredParameters(self.params, modifier_rank=0)
            self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False
