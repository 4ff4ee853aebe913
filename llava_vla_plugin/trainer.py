"""VLATrainer: upstream's LLaVATrainer made to run on transformers 4.57, plus VLA checkpoints and metrics.

Upstream fixes done here by subclassing rather than patch files (DESIGN.md section 3, edits 1, 3, 4, 8):
  1 `_inner_training_loop`: upstream's MeZO rewrite has ~30 undefined names; use HF's unless trainer_mode == "zo".
  3 `create_accelerator_and_postprocess`: upstream's passes arguments accelerate 1.x removed; use HF's.
  4 `_save_checkpoint(model, trial)`: HF dropped the `metrics` argument upstream still passes.
  8 `tokenizer=` became `processing_class=` (and only then is the tokenizer saved in checkpoints).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import numpy as np
import torch
import transformers
from llava.train.llava_trainer import LLaVATrainer, should_only_save_mm_adapter

from llava_vla_plugin import state
from llava_vla_plugin.action_tokenizer import ActionTokenizer

log = logging.getLogger(__name__)
STATS_NAME = "dataset_statistics.json"


def write_vla_files(output_dir: str, action_tokenizer: ActionTokenizer, statistics: dict) -> None:
    """What turns an upstream checkpoint into a usable policy: the action tokenizer and the statistics."""
    os.makedirs(output_dir, exist_ok=True)
    action_tokenizer.save(output_dir)
    tmp = os.path.join(output_dir, STATS_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(statistics, f, indent=2)
    os.replace(tmp, os.path.join(output_dir, STATS_NAME))


class ActionMetrics:
    """Running action-token accuracy and L1 (normalized units) between logging steps."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.correct = 0
        self.total = 0
        self.l1_sum = 0.0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor, action_tokenizer: ActionTokenizer) -> None:
        """logits [n, vocab] and targets [n] of the labelled positions (see sparse_head)."""
        first = int(action_tokenizer.token_ids[0])
        n_bins = action_tokenizer.n_bins
        mask = (targets >= first) & (targets < first + n_bins)
        if not mask.any():
            return
        pos_logits = logits[mask]
        target_bins = targets[mask] - first
        pred_ids = pos_logits.argmax(-1)
        # L1 decodes the most likely action token, even where a non-action token scored higher.
        pred_bins = pos_logits[:, first:first + n_bins].argmax(-1)
        self.correct += int((pred_ids == targets[mask]).sum())
        self.total += int(mask.sum())
        centers = torch.as_tensor(action_tokenizer.bin_centers, device=pred_bins.device, dtype=torch.float32)
        self.l1_sum += float((centers[pred_bins] - centers[target_bins]).abs().sum())

    def summary(self) -> dict[str, float]:
        if not self.total:
            return {}
        return {"action_accuracy": self.correct / self.total, "action_l1": self.l1_sum / self.total}


class VLATrainer(LLaVATrainer):
    def __init__(self, *args, tokenizer=None, **kwargs):
        if tokenizer is not None and kwargs.get("processing_class") is None:
            kwargs["processing_class"] = tokenizer
        super().__init__(*args, **kwargs)
        self.action_metrics = ActionMetrics()

    # ---- upstream fixes ------------------------------------------------------------------------
    def create_accelerator_and_postprocess(self):
        return transformers.Trainer.create_accelerator_and_postprocess(self)

    def _inner_training_loop(self, *args, **kwargs):
        if getattr(self, "trainer_mode", "regular") == "zo":
            return LLaVATrainer._inner_training_loop(self, *args, **kwargs)
        return transformers.Trainer._inner_training_loop(self, *args, **kwargs)

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        if should_only_save_mm_adapter(self.args):
            LLaVATrainer._save_checkpoint(self, model, trial)
            if self.args.should_save:
                out = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
                write_vla_files(out, state.get_action_tokenizer(), state.get_dataset_statistics())
            return None
        return transformers.Trainer._save_checkpoint(self, model, trial)

    # ---- VLA checkpoint files ------------------------------------------------------------------
    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            write_vla_files(output_dir, state.get_action_tokenizer(), state.get_dataset_statistics())

    # ---- metrics -------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        targets = state.pop_targets()
        logits = getattr(outputs, "logits", None)
        if targets is not None and logits is not None and state.get_action_tokenizer().first_token_id is not None:
            self.action_metrics.update(logits.detach(), targets.to(logits.device), state.get_action_tokenizer())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs.update(self.action_metrics.summary())
            self.action_metrics.reset()
        super().log(logs, *args, **kwargs)
