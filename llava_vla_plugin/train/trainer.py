"""VLATrainer: upstream's LLaVATrainer made to run on transformers 4.57, plus VLA checkpoints and metrics.

Upstream fixes done here by subclassing rather than patch files (docs/DESIGN.md section 3, edits 1, 3, 4, 8):
  1 `_inner_training_loop`: upstream's MeZO rewrite has ~30 undefined names; use HF's unless trainer_mode == "zo".
  3 `create_accelerator_and_postprocess`: upstream's passes arguments accelerate 1.x removed; use HF's.
  4 `_save_checkpoint(model, trial)`: HF dropped the `metrics` argument upstream still passes.
  8 `tokenizer=` became `processing_class=` (and only then is the tokenizer saved in checkpoints).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import random
from typing import Optional

import numpy as np

import torch
import transformers
from transformers import TrainerCallback
from llava.train.llava_trainer import LLaVATrainer, should_only_save_mm_adapter

from data_tools.atomic import write_json
from llava_vla_plugin.core import checkpoint
from llava_vla_plugin.train import lora
from llava_vla_plugin.core import run_config
from llava_vla_plugin.core.action_tokenizer import ActionTokenizer

log = logging.getLogger(__name__)


# The checkpoint's VLA files are checkpoint.py's (their one owner); the old name stays for callers.
write_vla_files = checkpoint.write


METRIC_DOC = """\
Action metrics and what they measure (all over the action-token positions of the labels):
  action_accuracy_teacher_forced              argmax over the whole vocabulary == the label's token, each
                                              position seeing the true previous tokens (teacher forcing).
                                              A non-action token winning counts as wrong.
  action_accuracy_teacher_forced_constrained  argmax over the action tokens only, teacher forced: what
                                              constrained decoding picks given the true previous tokens.
  action_l1                                   |bin centre of that constrained pick - label's bin centre|,
                                              normalized units.
  val_action_loss                             cross-entropy of the action tokens (validation only).
Validation also reports each of these per dataset of VAL_DATA, as val_<dataset>_<metric> (e.g.
val_bridge_orig_action_accuracy_teacher_forced), with val_<dataset>_action_tokens and val_<dataset>_frames:
the same sums over that dataset's samples only, so the token-weighted mean of the per-dataset numbers is the
mixture-wide one. A sample's dataset is its `dataset` field, else the folder of its data file.
Eval (`llava_vla_plugin.infer.eval`) reports `action_accuracy_generated`: constrained greedy generation as a
robot runs it, each token conditioned on the model's own previous picks. It is at most as high as the
teacher-forced constrained accuracy's first token and usually a little below it for later tokens.
Renamed from `action_accuracy` / `val_action_accuracy` (the full-vocabulary teacher-forced one).
"""


_METRIC_FIELDS = ("ce_sum", "correct", "constrained_correct", "l1_sum", "total")


def sample_dataset(sample: dict) -> str:
    """The dataset a validation sample belongs to: its `dataset` field (convert and vla-import write it), else the
    folder of its data file (convert's OUT/<dataset>/val.jsonl; training_data.SampleStore's `_source`)."""
    name = sample.get("dataset")
    if isinstance(name, str) and name:
        return name
    source = sample.get("_source")
    if not source:
        return "unknown"
    return os.path.basename(os.path.dirname(source)) or os.path.basename(source)


def metric_key_name(dataset: str) -> str:
    """A dataset name as it appears in metric keys (val_<name>_...): characters other than letters, digits,
    '.', '-' and '_' become '_', so the keys stay valid for loggers (wandb, tensorboard) and CSV headers."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in dataset)


def validation_groups(samples) -> tuple[list[str], np.ndarray]:
    """(sorted dataset names, the name's index for every sample): the same on every rank, which all hold the
    whole validation set, so the per-dataset sums line up in one all_reduce."""
    names = [sample_dataset(samples[i]) for i in range(len(samples))]
    groups = sorted(set(names))
    keys: dict[str, str] = {}
    for g in groups:
        other = keys.setdefault(metric_key_name(g), g)
        if other != g:
            raise ValueError(f"validation datasets {other!r} and {g!r} would share the metric keys "
                             f"val_{metric_key_name(g)}_*: rename one (its samples' `dataset` field)")
    index = {g: k for k, g in enumerate(groups)}
    return groups, np.asarray([index[n] for n in names], dtype=np.int64)


def output_rows(out, keep: torch.Tensor):
    """The part of a forward's output (sparse_head.SparseHeadOutput) that belongs to the batch rows where `keep`
    (bool [batch]) is true, with the fields every representation's metrics read (update_output)."""
    from types import SimpleNamespace

    part = SimpleNamespace(targets=None, logits=None, action_pred=None, action_targets=None)
    targets, logits = getattr(out, "targets", None), getattr(out, "logits", None)
    if targets is not None and logits is not None:
        rows = getattr(out, "target_rows", None)
        if rows is None:
            raise RuntimeError("per-dataset validation needs the forward's target_rows (sparse_head.SparseHeadOutput); "
                               "this model's forward does not return them")
        sel = keep.to(rows.device)[rows]
        part.targets, part.logits = targets[sel], logits[sel]
    pred = getattr(out, "action_pred", None)
    if pred is not None:
        if pred.shape[0] != keep.shape[0]:
            raise RuntimeError(f"per-dataset validation: {pred.shape[0]} action predictions for a batch of {keep.shape[0]} "
                               "samples (every validation sample must carry an action)")
        k = keep.to(pred.device)
        part.action_pred, part.action_targets = pred[k], out.action_targets[k]
    return part


def validation_metrics(sums: torch.Tensor, groups: list[str]) -> dict:
    """Metric dict from the rank-reduced sums: row 0 the mixture-wide ones (the keys validation always had), row
    1 + k dataset k's as val_<dataset>_<metric> plus its action tokens and frames. Columns: _METRIC_FIELDS, frames."""
    def named(prefix: str, row) -> dict:
        count = max(float(row[4]), 1.0)
        return {f"{prefix}action_loss": float(row[0]) / count, f"{prefix}action_accuracy_teacher_forced": float(row[1]) / count,
                f"{prefix}action_accuracy_teacher_forced_constrained": float(row[2]) / count,
                f"{prefix}action_l1": float(row[3]) / count, f"{prefix}action_tokens": int(row[4])}
    metrics = named("val_", sums[0])
    for k, name in enumerate(groups):
        key = f"val_{metric_key_name(name)}_"
        metrics.update(named(key, sums[1 + k]))
        metrics[f"{key}frames"] = int(sums[1 + k][5])
    return metrics


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


class TrainingCurvesCallback(TrainerCallback):
    """OUTPUT_DIR/training_curves.png at the end of training (training_curves.py), on the saving rank, after
    the final validation (this callback is added after ValidationCallback). A plot that fails is a warning:
    it never fails a finished run."""

    def on_train_end(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        from llava_vla_plugin.train import training_curves
        try:
            path = training_curves.write_training_curves(args.output_dir, state.log_history,
                                                         f"{args.output_dir} (step {state.global_step})")
            log.info("training curves: %s", path)
        except Exception as e:  # noqa: BLE001 - the checkpoint matters, the picture does not
            log.warning("could not write %s/%s: %s", args.output_dir, training_curves.FILE_NAME, e)


def seed_dataloader_worker(worker_id: int, seed: int, num_workers: int, rank: int) -> None:
    """worker_init_fn: worker `worker_id` of rank `rank` gets seed + rank * num_workers + worker_id, so
    every worker's RNGs are distinct and the same in every run with the same --seed. (Upstream passes
    transformers' seed_worker unbound, which transformers 4.57 calls with two more arguments.)"""
    worker_seed = (seed + rank * num_workers + worker_id) % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)
    torch.manual_seed(worker_seed)


class AugmentEpochCallback(TrainerCallback):
    """--vla_image_aug: tells the training dataset the epoch before the epoch's data-loader workers start.

    transformers' training loop calls on_epoch_begin before `iter(dataloader)`, which starts the workers (each
    takes a copy of the dataset, epoch included). The epoch is the trainer's (state.epoch is e at the start of
    epoch e, and fractional on resume inside one: floor), so a resumed run draws the same parameters as an
    uninterrupted one. Persistent workers would keep epoch 0's copy: VLATrainer refuses that combination."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_augment_epoch(math.floor((state.epoch or 0.0) + 1e-6))


class TokensSeenCallback(TrainerCallback):
    """Adds the sequence positions (visual + text, padding excluded) every rank processed in the step to
    state.num_input_tokens_seen: counted, summed across ranks, and saved in trainer_state.json with
    every checkpoint, so a resumed run continues from the checkpoint's count."""

    def __init__(self, trainer: "VLATrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state_, control, **kwargs):
        self.trainer.sync_tokens_seen()


class SetupReportCallback(TrainerCallback):
    """Logs what the launcher's defaults turned on, as the model and loader have it once training
    starts (HF enables gradient checkpointing inside the training loop, not before)."""

    def __init__(self, trainer: "VLATrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state_, control, **kwargs):
        model = self.trainer.model
        log.warning("gradient checkpointing %s, %d dataloader workers, image_aspect_ratio %s",
                    "on" if getattr(model, "is_gradient_checkpointing", False) else "off", args.dataloader_num_workers,
                    getattr(getattr(model, "config", None), "image_aspect_ratio", "?"))


class LoRAFinalSaveCallback(TrainerCallback):
    """LoRA runs: a complete checkpoint in OUTPUT_DIR (upstream's own LoRA save after train() writes no
    tokenizer and no VLA files), then, after train() returned, OUTPUT_DIR/merged (lora.merge_pending)."""

    def __init__(self, trainer: "VLATrainer"):
        self.trainer = trainer

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.save_model(args.output_dir)  # every rank: gathers ZeRO-3 weights
        if args.should_save and getattr(args, "vla_lora_merge", True):
            lora.request_merge(args.output_dir)


class RemixEndCallback(TrainerCallback):
    """Re-Mix proxy runs: the learned weights, their figure and a training mixture, at the end of training."""

    def __init__(self, trainer: "VLATrainer"):
        self.trainer = trainer

    def on_train_end(self, args, state, control, **kwargs):
        if args.should_save:
            data_path = getattr(getattr(self.trainer.train_dataset, "data_args", None), "data_path", None) or ""
            self.trainer.remix.finish(args.output_dir, data_path)


class VLATrainer(LLaVATrainer):
    def __init__(self, *args, tokenizer=None, **kwargs):
        if tokenizer is not None and kwargs.get("processing_class") is None:
            kwargs["processing_class"] = tokenizer
        action_repr = getattr(kwargs.get("train_dataset"), "action_repr", None)
        is_lora = lora.is_peft_model(kwargs.get("model"))
        if is_lora and action_repr is not None and not action_repr.supports_lora:
            from llava_vla_plugin.core.representations import ActionReprError

            raise ActionReprError(f"--vla_action_repr {action_repr.name} does not support --lora_enable True yet (see its "
                                  "module docstring): train it without LoRA, or use --vla_action_repr bins_chunk or "
                                  "parallel_l1 (both train with LoRA)")
        if action_repr is not None and kwargs.get("model") is not None:  # a head / rows before the optimizer exists
            action_repr.prepare_model(kwargs["model"], kwargs.get("processing_class"))
        if is_lora:  # before the optimizer exists: the representation's rows must be among its parameters
            lora.enable_action_token_training(kwargs["model"], action_repr.trained_token_ids(kwargs.get("processing_class")))
        from llava_vla_plugin.core.env import UPSTREAM_TRAINER_PRINTS, prints_dropped

        with prints_dropped(UPSTREAM_TRAINER_PRINTS):  # upstream's "MeZOLLaVATrainer initialized" (env.py says why)
            super().__init__(*args, **kwargs)
        self.action_metrics = self.action_repr.metrics()
        self.tokens_pending = 0  # this rank's positions since the last step (sparse head's num_tokens); see sync_tokens_seen
        self.val_dataset = None
        self.last_val_metrics: dict = {}
        data_args = getattr(self.train_dataset, "data_args", None)
        val_path = getattr(data_args, "vla_val_data", None)
        if val_path:
            from llava_vla_plugin.train.dataset import VLADataset

            self.val_dataset = VLADataset(val_path, self.processing_class, data_args, is_eval=True)
            self._val_groups = validation_groups(self.val_dataset.list_data_dict)  # at start: a clash fails now
        self.add_callback(ValidationCallback(self, int(getattr(data_args, "vla_eval_steps", 0) or 0)))
        self.add_callback(TrainingCurvesCallback())  # after ValidationCallback: the final validation is plotted
        if is_lora:
            self.add_callback(LoRAFinalSaveCallback(self))

        if self.args.include_num_input_tokens_seen not in ("no", False):
            raise ValueError("--include_num_input_tokens_seen counts input_ids before the image tokens are inserted; the VLA "
                             "trainer counts every position itself (train_tokens_seen): drop the flag")
        if getattr(self.train_dataset, "image_aug", False):
            if self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0:
                raise ValueError("--vla_image_aug True with --dataloader_persistent_workers True: persistent workers keep "
                                 "the dataset they copied at the first epoch, so every epoch would repeat epoch 0's "
                                 "augmentation. Pass --dataloader_persistent_workers False (or IMAGE_AUG=0)")
            self.add_callback(AugmentEpochCallback(self.train_dataset))
        self.add_callback(TokensSeenCallback(self))
        self.add_callback(SetupReportCallback(self))
        self.remix = None
        if getattr(self.args, "vla_remix_reference", None):
            self._start_remix()

    # ---- Re-Mix proxy runs (train/remix.py) -------------------------------------------------------
    def _start_remix(self) -> None:
        """A proxy run: the reference model, the domains and their initial weights; refused where Re-Mix's one
        update per batch or a whole reference model per rank cannot hold."""
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        from llava_vla_plugin.train import remix

        ref = self.args.vla_remix_reference
        if self.args.gradient_accumulation_steps != 1:
            raise remix.RemixError(f"Re-Mix updates the dataset weights once per batch (train_remix.py has no gradient "
                                   f"accumulation); GRAD_ACCUM={self.args.gradient_accumulation_steps}: set GRAD_ACCUM=1 and "
                                   "raise BATCH_SIZE or NUM_GPUS for a larger batch")
        if is_deepspeed_zero3_enabled():
            raise remix.RemixError("Re-Mix keeps the whole reference model on every rank, which ZeRO-3 would shard: run the "
                                   "proxy with DEEPSPEED=configs/zero2.json (a proxy is small by design)")
        domains, counts = self.train_dataset.enable_domains()
        first = next(self.model.parameters())
        reference_model = remix.load_reference(ref, self.action_repr, self.processing_class, self.args.device, first.dtype,
                                               self.dataset_statistics)
        self.remix = remix.Remix(domains, counts, ref, reference_model, self.args.vla_remix_step_size,
                                 self.args.vla_remix_smoothing)
        log.warning("Re-Mix proxy run against %s: %d domains, initial weights %s (step size %g, smoothing %g)", ref,
                    len(domains), ", ".join(f"{d} {a:.4f}" for d, a in zip(domains, self.remix.initial)),
                    self.remix.step_size, self.remix.smoothing)
        self.add_callback(RemixEndCallback(self))

    def _remix_loss(self, model, inputs: dict):
        """The proxy objective for this batch (Remix.objective) and the proxy's output (for the metrics)."""
        domain = inputs.pop("vla_domain", None)
        if domain is None:
            raise RuntimeError("Re-Mix: the batch has no vla_domain (the training dataset's enable_domains was not called)")
        outputs = model(**inputs)
        with torch.no_grad():
            ref_out = self.remix.reference_model(**inputs)
        n = len(inputs["input_ids"])
        from llava_vla_plugin.train import remix

        unwrapped = self.accelerator.unwrap_model(model)
        head = getattr(unwrapped, "vla_action_head", None)
        proxy_losses = remix.per_sample_losses(outputs, n, head)
        ref_losses = remix.per_sample_losses(ref_out, n, getattr(self.remix.reference_model, "vla_action_head", None))
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        loss = self.remix.objective(proxy_losses, ref_losses, domain, self.args.world_size if dist else 1,
                                    torch.distributed.all_reduce if dist else None)
        if self.args.should_save:
            self.remix.append_curve(self.args.output_dir, self.state.global_step + 1)
        return loss, outputs

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

    # ---- data loading: deterministic worker seeds (upstream's crashes with num_workers > 0) -------
    def get_train_dataloader(self):
        """Upstream's loader parameters with a worker_init_fn that works on transformers 4.57."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        workers = self.args.dataloader_num_workers
        params = {
            "batch_size": self._train_batch_size,
            "collate_fn": self._get_collator_with_removed_columns(self.data_collator, description="training"),
            "num_workers": workers,
            "pin_memory": self.args.dataloader_pin_memory,
            "persistent_workers": self.args.dataloader_persistent_workers and workers > 0,
            "sampler": self._get_train_sampler(),
            "drop_last": self.args.dataloader_drop_last,
        }
        if workers > 0:
            params["worker_init_fn"] = functools.partial(seed_dataloader_worker, seed=self.args.seed, num_workers=workers,
                                                         rank=self.args.process_index)
            params["prefetch_factor"] = self.args.dataloader_prefetch_factor or 2
        return self.accelerator.prepare(torch.utils.data.DataLoader(self.train_dataset, **params))

    # ---- explicit resume, run configuration ------------------------------------------------------
    def run_configuration(self) -> dict:
        return run_config.run_config(self.args, getattr(self.train_dataset, "data_args", None), getattr(self.model, "config", None))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Upstream resumes whenever OUTPUT_DIR holds a checkpoint; here --vla_resume decides (run_config)."""
        mode = getattr(self.args, "vla_resume", "auto") or "auto"
        ckpt = run_config.resolve_resume(mode, self.args.output_dir)
        config = self.run_configuration()
        if ckpt is not None:
            run_config.check_resumable(ckpt, config)
            log.warning("resuming from %s (RESUME=%s)", ckpt, mode)
            if self.remix is not None:
                step = json.loads(open(os.path.join(ckpt, "trainer_state.json")).read())["global_step"]
                self.remix.resume(ckpt, self.args.output_dir, int(step))
        elif self.remix is not None and self.args.should_save:  # a fresh proxy: no curve rows of an earlier attempt
            from data_tools.remix_weights import CURVE_NAME

            curve = os.path.join(self.args.output_dir, CURVE_NAME)
            if os.path.exists(curve):
                os.remove(curve)
        else:
            log.warning("starting a new run in %s (no checkpoint to resume; RESUME=%s)", self.args.output_dir, mode)
        if self.args.should_save:
            run_config.write_run_config(self.args.output_dir, config)
            run_config.commit_launch_config(self.args.output_dir)
        return super().train(resume_from_checkpoint=ckpt, *args, **kwargs)

    # ---- tokens seen ------------------------------------------------------------------------------
    def sync_tokens_seen(self) -> None:
        t = torch.tensor([self.tokens_pending], dtype=torch.int64, device=self.args.device)
        self.tokens_pending = 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(t)
        self.state.num_input_tokens_seen = int(self.state.num_input_tokens_seen or 0) + int(t[0])

    def record_batch_digest(self, inputs: dict) -> None:
        """--vla_log_batch_digests: one sha256 per micro-batch (token ids, labels, pixels) in
        OUTPUT_DIR/batch_digests.jsonl, so two runs can be checked to have seen the same data in the
        same order (e.g. with different --dataloader_num_workers). Rank 0's batches only."""
        if not getattr(self.args, "vla_log_batch_digests", False) or self.args.process_index != 0:
            return
        text, everything = hashlib.sha256(), hashlib.sha256()
        for key in sorted(inputs):
            values = inputs[key] if isinstance(inputs[key], (list, tuple)) else [inputs[key]]
            for v in values:
                if isinstance(v, torch.Tensor):
                    data = key.encode() + v.detach().float().cpu().numpy().tobytes()
                    everything.update(data)
                    if key in ("input_ids", "labels"):
                        text.update(data)
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, "batch_digests.jsonl"), "a") as f:
            # text: token ids and labels only (the same samples in the same order, whatever the image mode)
            f.write(json.dumps({"step": self.state.global_step, "text_sha256": text.hexdigest(),
                                "sha256": everything.hexdigest()}) + "\n")

    # ---- held-out validation -------------------------------------------------------------------
    @torch.no_grad()
    def run_validation(self) -> dict:
        if self.val_dataset is None:
            return {}
        rank, world = self.args.process_index, self.args.world_size
        indices = list(range(rank, len(self.val_dataset), world))
        if getattr(self, "_val_groups", None) is None:  # once: which dataset each validation sample is from
            self._val_groups = validation_groups(self.val_dataset.list_data_dict)
        groups, group_of = self._val_groups
        group_of = group_of[np.asarray(indices, dtype=np.int64)]
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(self.val_dataset, indices),
                                             batch_size=self.args.per_device_eval_batch_size, shuffle=False,
                                             collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers)
        model = self.model
        was_training = model.training
        model.eval()
        val = self.action_repr.metrics()  # mixture-wide: fed whole batches, as always
        per = [self.action_repr.metrics() for _ in groups]  # one instance per dataset, fed its rows of each batch
        frames = np.zeros(len(groups), dtype=np.int64)
        start = 0
        for batch in loader:
            batch = self._prepare_inputs(batch)
            out = model(**{k: v for k, v in batch.items() if k not in ("prompts", "ids")})
            val.update_output(out, with_loss=True)
            rows = group_of[start:start + len(batch["input_ids"])]
            start += len(rows)
            for g in np.unique(rows):
                frames[g] += int((rows == g).sum())
                part = out if (rows == g).all() else output_rows(out, torch.as_tensor(rows == g))
                per[g].update_output(part, with_loss=True)
        if was_training:
            model.train()
        # one all_reduce of every sum (row 0 mixture-wide, then one row per dataset): per-dataset numbers are
        # reduced exactly as the mixture-wide ones always were (sums, then one division)
        sums = torch.tensor([[getattr(m, f) for f in _METRIC_FIELDS] + [n] for m, n in
                             [(val, int(frames.sum())), *zip(per, frames.tolist())]], dtype=torch.float64, device=self.args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        metrics = validation_metrics(sums, groups)
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
        tokens_seen = int(self.state.num_input_tokens_seen or 0) or None  # counted: TokensSeenCallback
        final = {"step": self.state.global_step, **val_metrics, "train_frames": len(self.train_dataset),
                 "train_samples_seen": samples_seen, "train_tokens_seen": tokens_seen, "model_params": params,
                 "compute_flops": 6.0 * params * tokens_seen if tokens_seen else None}
        write_json(os.path.join(self.args.output_dir, "final_metrics.json"), final)

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
                write_vla_files(out, self.action_tokenizer, self.dataset_statistics, self.action_repr, self.model,
                                inputs=getattr(self.train_dataset, "inputs", None))
            return None
        transformers.Trainer._save_checkpoint(self, model, trial)
        self._after_checkpoint(trial)
        return None

    def _after_checkpoint(self, trial) -> None:
        """Each checkpoint records the run configuration (checked on resume); older checkpoints lose
        their optimizer state unless --vla_keep_optimizer_state all (run_config.prune_optimizer_state)."""
        if not self.args.should_save:
            return
        run_dir = self._get_output_dir(trial=trial)
        run_config.write_run_config(os.path.join(run_dir, f"checkpoint-{self.state.global_step}"), self.run_configuration())
        if self.remix is not None:
            self.remix.save_state(os.path.join(run_dir, f"checkpoint-{self.state.global_step}"))
        run_config.prune_optimizer_state(run_dir, getattr(self.args, "vla_keep_optimizer_state", "latest"))

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
            write_vla_files(output_dir, self.action_tokenizer, self.dataset_statistics, self.action_repr, self.model, state_dict,
                            inputs=getattr(self.train_dataset, "inputs", None))

    # ---- metrics -------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.record_batch_digest(inputs)
        if self.remix is not None:
            loss, outputs = self._remix_loss(model, inputs)
        else:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if getattr(outputs, "num_tokens", None) is not None:
            self.tokens_pending += outputs.num_tokens
        self.action_metrics.update_output(outputs)  # sparse_head.SparseHeadOutput; the representation's metrics
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs.update(self.action_metrics.summary())
            if getattr(self, "remix", None) is not None:  # `loss` is then Re-Mix's objective (weighted excess loss)
                logs.update(self.remix.log_values())
            self.action_metrics.reset()
            logs["train_tokens_seen"] = int(self.state.num_input_tokens_seen or 0)
        super().log(logs, *args, **kwargs)
