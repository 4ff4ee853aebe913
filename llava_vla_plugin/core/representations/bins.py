"""`bins` and `bins_chunk`: H x D tokens of 256 uniform bins (OpenVLA's action tokens), autoregressive."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from llava_vla_plugin.core.action_tokenizer import ActionTokenizer
from llava_vla_plugin.core.representations.base import ActionRepresentation, ActionReprError, TokenPlan, metric_summary


class ActionMetrics:
    """Running action-token accuracies, L1 (normalized units) and, optionally, cross-entropy over the
    action tokens: between logging steps in training, over the whole held-out set in validation.
    Names and meanings: trainer.METRIC_DOC."""

    def __init__(self, action_tokenizer: ActionTokenizer | None = None) -> None:
        self.action_tokenizer = action_tokenizer
        self.reset()

    def reset(self) -> None:
        self.correct = 0
        self.constrained_correct = 0
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
        self.constrained_correct += int((pred_bins == target_bins).sum())
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
        """Training-log names (validation prefixes `val_`); see METRIC_DOC for what each measures."""
        return metric_summary(self)



class BinsRepresentation(ActionRepresentation):
    """H x D tokens of 256 uniform bins, autoregressive; H = 1 for `bins`."""

    name = "bins"

    @property
    def n_action_tokens(self) -> int:
        return self.horizon * self.action_dim

    @property
    def answer_tokens(self) -> int:
        return self.n_action_tokens + 1  # + <|im_end|>

    def build(self, prompt_builder, instruction, window):
        window = np.asarray(window)
        if window.shape != (self.horizon, self.action_dim):
            raise ActionReprError(f"action window has shape {window.shape}, expected ({self.horizon}, {self.action_dim})")
        input_ids, labels = prompt_builder.build(instruction, window.reshape(-1))
        return input_ids, labels, {}

    def metrics(self):
        return ActionMetrics(self.action_tokenizer)

    def token_plan(self, tokenizer) -> TokenPlan:
        """Exactly H x D of the 256 action tokens, then the end."""
        at = self.action_tokenizer
        return TokenPlan(int(at.token_ids[0]), at.n_bins, self.n_action_tokens, exact=True)

    def predict_normalized(self, policy, inputs) -> np.ndarray:
        ids = policy.action_ids_from_inputs(inputs)
        return self.action_tokenizer.decode_ids(ids).reshape(len(ids), self.horizon, self.action_dim)


class BinsChunkRepresentation(BinsRepresentation):
    """H x D action tokens (step-major), autoregressive, decoding constrained to action tokens; HORIZON > 1."""

    name = "bins_chunk"
