"""VLATrainer: upstream's LLaVATrainer made to run on transformers 4.57, plus VLA checkpoints and metrics.

Upstream fixes done here by subclassing rather than patch files (docs/DESIGN.md section 3, edits 1, 3, 4, 8):
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

import torch
import torch.nn.functional as F
import transformers
from transformers import TrainerCallback
from llava.train.llava_trainer import LLaVATrainer, should_only_save_mm_adapter

from llava_vla_plugin import lora
from llava_vla_plugin.action_tokenizer import ActionTokenizer
from llava_vla_plugin.normalization import STATS_NAME

log = logging.getLogger(__name__)


def write_vla_files(output_dir: str, action_tokenizer: ActionTokenizer, statistics: dict, action_repr=None,
                    model=None, state_dict=None) -> None:
    """What turns an upstream checkpoint into a usable policy: the action tokenizer, the action representation
    (its config, and its head where it has one) and the statistics."""
    os.makedirs(output_dir, exist_ok=True)
    action_tokenizer.save(output_dir)
    if action_repr is not None:
        action_repr.save(output_dir, model=model, state_dict=state_dict)
    tmp = os.path.join(output_dir, STATS_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(statistics, f, indent=2)
    os.replace(tmp, os.path.join(output_dir, STATS_NAME))


class ActionMetrics:
    """Running action-token accuracy, L1 (normalized units) and, optionally, cross-entropy over the
    action tokens: between logging steps in training, over the whole held-out set in validation."""

    def __init__(self, action_tokenizer: ActionTokenizer | None = None) -> None:
        self.action_tokenizer = action_tokenizer
        self.reset()

    def reset(self) -> None:
        self.correct = 0
        self.total = 0
        self.l1_sum = 0.0
        self.ce_sum = 0.0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor, action_tokenizer: ActionTokenizer, with_loss: bool = False) -> None:
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
        if with_loss:  # the training loss is logged already; validation needs the action-token part
            self.ce_sum += float(F.cross_entropy(pos_logits.float(), targets[mask], reduction="sum"))

    def update_output(self, out, with_loss: bool = False) -> None:
        """From a sparse_head.SparseHeadOutput (the interface every representation's metrics share)."""
        targets, logits = getattr(out, "targets", None), getattr(out, "logits", None)
        at = self.action_tokenizer
        if targets is not None and logits is not None and at is not None and at.first_token_id is not None:
            self.update(logits.detach(), targets.to(logits.device), at, with_loss=with_loss)

    def summary(self) -> dict[str, float]:
        if not self.total:
            return {}
        return {"action_accuracy": self.correct / self.total, "action_l1": self.l1_sum / self.total}


class ValidationCallback(TrainerCallback):
    """Held-out evaluation every `every` steps and at the end of training."""

    def __init__(self, trainer: "VLATrainer", every: int):
        self.trainer = trainer
        self.every = every
        self.last_step = -1

    def on_step_end(self, args, state, control, **kwargs):
        if self.every > 0 and state.global_step % self.every == 0 and state.global_step != self.last_step:
            self.last_step = state.global_step
            self.trainer.run_validation()

    def on_train_end(self, args, state, control, **kwargs):
        metrics = self.trainer.run_validation() if state.global_step != self.last_step else self.trainer.last_val_metrics
        self.trainer.write_final_metrics(metrics or {})


class LoRAFinalSaveCallback(TrainerCallback):
    """LoRA runs: a complete checkpoint in OUTPUT_DIR (upstream's own LoRA save after train() writes no
    tokenizer and no VLA files), then, after train() returned, OUTPUT_DIR/merged (lora.merge_pending)."""

    def __init__(self, trainer: "VLATrainer"):
        self.trainer = trainer

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.save_model(args.output_dir)  # every rank: gathers ZeRO-3 weights
        if args.should_save and getattr(args, "vla_lora_merge", True):
            lora.request_merge(args.output_dir)


class VLATrainer(LLaVATrainer):
    def __init__(self, *args, tokenizer=None, **kwargs):
        if tokenizer is not None and kwargs.get("processing_class") is None:
            kwargs["processing_class"] = tokenizer
        action_repr = getattr(kwargs.get("train_dataset"), "action_repr", None)
        is_lora = lora.is_peft_model(kwargs.get("model"))
        if is_lora and action_repr is not None and not action_repr.supports_lora:
            from llava_vla_plugin.action_repr import ActionReprError

            raise ActionReprError(f"--vla_action_repr {action_repr.name} does not support --lora_enable True yet (its head "
                                  "is not part of the LoRA adapter and would not be saved or merged): train it without "
                                  "LoRA, or use --vla_action_repr bins_chunk (token chunks train with LoRA)")
        if action_repr is not None and kwargs.get("model") is not None:  # a head / rows before the optimizer exists
            action_repr.prepare_model(kwargs["model"], kwargs.get("processing_class"))
        if is_lora:  # before the optimizer exists: the action rows must be among its parameters
            lora.enable_action_token_training(kwargs["model"], kwargs["train_dataset"].action_tokenizer.token_ids)
        super().__init__(*args, **kwargs)
        self.action_metrics = self.action_repr.metrics()
        self.tokens_seen, self.sequences_seen = 0, 0  # this rank's, from the sparse head's outputs
        self.val_dataset = None
        self.last_val_metrics: dict = {}
        data_args = getattr(self.train_dataset, "data_args", None)
        val_path = getattr(data_args, "vla_val_data", None)
        if val_path:
            from llava_vla_plugin.dataset import VLADataset

            self.val_dataset = VLADataset(val_path, self.processing_class, data_args, is_eval=True)
        self.add_callback(ValidationCallback(self, int(getattr(data_args, "vla_eval_steps", 0) or 0)))
        if is_lora:
            self.add_callback(LoRAFinalSaveCallback(self))

    # ---- what the training data carries (no process-wide state: the dataset owns both) ----------
    @property
    def action_tokenizer(self) -> ActionTokenizer:
        """The train dataset's action tokenizer, bound to the tokenizer the dataset was built with."""
        return self.train_dataset.action_tokenizer

    @property
    def action_repr(self):
        """The train dataset's action representation (action_repr.py): targets, metrics, checkpoint files."""
        return self.train_dataset.action_repr

    @property
    def dataset_statistics(self) -> dict:
        """The statistics of the training data (a checkpoint carries them for un-normalization)."""
        return self.train_dataset.dataset_statistics

    # ---- held-out validation -------------------------------------------------------------------
    @torch.no_grad()
    def run_validation(self) -> dict:
        if self.val_dataset is None:
            return {}
        rank, world = self.args.process_index, self.args.world_size
        indices = list(range(rank, len(self.val_dataset), world))
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(self.val_dataset, indices),
                                             batch_size=self.args.per_device_eval_batch_size, shuffle=False,
                                             collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers)
        model = self.model
        was_training = model.training
        model.eval()
        val = self.action_repr.metrics()
        for batch in loader:
            batch = self._prepare_inputs(batch)
            out = model(**{k: v for k, v in batch.items() if k not in ("prompts", "ids")})
            val.update_output(out, with_loss=True)
        if was_training:
            model.train()
        sums = torch.tensor([val.ce_sum, val.correct, val.l1_sum, val.total], dtype=torch.float64, device=self.args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        count = max(float(sums[3]), 1.0)
        metrics = {"val_action_loss": float(sums[0]) / count, "val_action_accuracy": float(sums[1]) / count,
                   "val_action_l1": float(sums[2]) / count, "val_action_tokens": int(sums[3])}
        self.last_val_metrics = metrics
        self.log(dict(metrics))
        if self.args.should_save:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, "vla_metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": self.state.global_step, **metrics}) + "\n")
        return metrics

    def write_final_metrics(self, val_metrics: dict) -> None:
        """What scaling studies read: held-out metrics and how much data/compute the run used."""
        if not self.args.should_save:
            return
        params = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())
        global_batch = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        samples_seen = self.state.global_step * global_batch
        per_sample = self.tokens_seen / self.sequences_seen if self.sequences_seen else None
        tokens_seen = int(per_sample * samples_seen) if per_sample else None
        final = {"step": self.state.global_step, **val_metrics, "train_frames": len(self.train_dataset),
                 "train_samples_seen": samples_seen, "train_tokens_seen": tokens_seen, "model_params": params,
                 "compute_flops": 6.0 * params * tokens_seen if tokens_seen else None}
        tmp = os.path.join(self.args.output_dir, "final_metrics.json.tmp")
        with open(tmp, "w") as f:
            json.dump(final, f, indent=2)
        os.replace(tmp, os.path.join(self.args.output_dir, "final_metrics.json"))

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
                write_vla_files(out, self.action_tokenizer, self.dataset_statistics, self.action_repr, self.model)
            return None
        return transformers.Trainer._save_checkpoint(self, model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if lora.is_peft_model(model if model is not None else self.model):  # HF restores the adapter only
            lora.load_non_lora_trainables(model if model is not None else self.model, resume_from_checkpoint)

    # ---- VLA checkpoint files ------------------------------------------------------------------
    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save and lora.is_peft_model(self.model):
            lora.save_lora_extras(self.model, output_dir, state_dict)
        if self.args.should_save:
            write_vla_files(output_dir, self.action_tokenizer, self.dataset_statistics, self.action_repr, self.model, state_dict)

    # ---- metrics -------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if getattr(outputs, "num_tokens", None) is not None:
            self.tokens_seen += outputs.num_tokens
            self.sequences_seen += outputs.num_sequences
        self.action_metrics.update_output(outputs)  # sparse_head.SparseHeadOutput; the representation's metrics
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs.update(self.action_metrics.summary())
            self.action_metrics.reset()
        super().log(logs, *args, **kwargs)
