"""`parallel_l1`: OpenVLA-OFT's parallel decoding with an L1-regression head (overview: the package docstring)."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from data_tools.atomic import write_bytes
from data_tools.converted_format import IGNORE_INDEX
from llava_vla_plugin.core.action_tokenizer import ActionTokenizer
from llava_vla_plugin.core.representations.base import (HEAD_FILE, SLOT_TOKEN, ActionHead, ActionRepresentation, head_host,
                                                        ActionReprConfig, ActionReprError, metric_summary)
from llava_vla_plugin.core.zero import gathered

log = logging.getLogger(__name__)


class L1RegressionHead(ActionHead):
    """Each chunk step's D placeholder hidden states (concatenated) -> D continuous values (OFT's
    L1RegressionActionHead shape: LayerNorm, 2-layer GELU MLP, linear out), plus one learned input
    embedding per placeholder position (`slots`, added to the `<ACTION_SLOT>` embedding before the LM).

    Why the slot embeddings: the H*D placeholders share one token, so what tells their hidden states apart
    is only RoPE's relative positions -- a small LM (the tiny test model: 2 layers) then gives every
    step nearly the same hidden state and the head, shared across steps, cannot tell step 1 from step 3
    (numbers in the module docstring).
    Distinct learned queries (as DETR's object queries) let each position ask the prompt its own question.
    Under ZeRO-3 they are read through the `slots` submodule's forward, so DeepSpeed gathers them.
    """

    def __init__(self, hidden_size: int, action_dim: int, horizon: int, width: int, slot_token_id: int,
                 slot_init_std: float = 0.02):
        super().__init__()
        self.hidden_size, self.action_dim, self.horizon = hidden_size, action_dim, horizon
        self.slot_token_id = slot_token_id
        self.slots = torch.nn.Embedding(horizon * action_dim, hidden_size)
        torch.nn.init.normal_(self.slots.weight, std=slot_init_std)
        self.net = torch.nn.Sequential(
            torch.nn.LayerNorm(action_dim * hidden_size), torch.nn.Linear(action_dim * hidden_size, width), torch.nn.GELU(),
            torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, action_dim))

    @property
    def n_slots(self) -> int:
        return self.horizon * self.action_dim

    def slot_embeddings(self, n_seq: int, dtype: torch.dtype) -> torch.Tensor:
        """[n_seq * H * D, hidden]: the learned embedding of each placeholder position, sequence-major.
        Called as a submodule (not by reading the weight) so ZeRO-3 gathers it."""
        idx = torch.arange(self.n_slots, device=self.slots.weight.device).repeat(n_seq)
        return self.slots(idx).to(dtype)

    def forward(self, slot_hidden: torch.Tensor) -> torch.Tensor:
        """[B, H*D, hidden] -> [B, H, D]"""
        b = slot_hidden.shape[0]
        x = slot_hidden.reshape(b, self.horizon, self.action_dim * self.hidden_size)
        return self.net(x.to(self.net[1].weight.dtype))

    # -- the ActionHead interface (train/sparse_head.py, infer/upstream_backend.py) --
    def embed_inputs(self, inputs_embeds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return regression_inputs(self, inputs_embeds, labels)

    def training_outputs(self, hidden, labels, action_targets):
        return regression_forward(self, hidden, labels, action_targets)

    def loss(self, pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """OFT's L1 loss on the normalized actions."""
        return torch.nn.functional.l1_loss(pred.float(), targets.float())


def _slot_mask(head: L1RegressionHead, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Placeholder positions (labelled with their own id so that they survive upstream's image expansion and
    padding aligned with the embeddings) and how many sequences carry them (each all H*D, or none)."""
    slots = labels == head.slot_token_id
    per_seq = slots.sum(dim=1)
    if not bool(((per_seq == 0) | (per_seq == head.n_slots)).all()):
        raise ActionReprError(f"a sequence has {per_seq.tolist()} action placeholders, expected 0 or {head.n_slots} "
                              "(truncated by model_max_length?)")
    return slots, int((per_seq > 0).sum())


def regression_inputs(head: L1RegressionHead, inputs_embeds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Training inputs: the slot embeddings added at the placeholder positions (out of place: autograd)."""
    slots, n_seq = _slot_mask(head, labels)
    if n_seq == 0:
        return inputs_embeds
    inputs_embeds = inputs_embeds.clone()
    inputs_embeds[slots] = inputs_embeds[slots] + head.slot_embeddings(n_seq, inputs_embeds.dtype)
    return inputs_embeds


def regression_forward(head: L1RegressionHead, hidden: torch.Tensor, labels: torch.Tensor,
                       action_targets: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Training forward of the head (called by sparse_head): labels without the placeholder positions (for the
    LM-head cross-entropy), predictions [n, H, D] and their L1 loss targets."""
    slots, n_seq = _slot_mask(head, labels)
    ce_labels = labels.masked_fill(slots, IGNORE_INDEX)
    if n_seq == 0:
        return ce_labels, None, None
    if action_targets is None or action_targets.shape[0] != n_seq:
        raise ActionReprError(f"{n_seq} sequences with action placeholders but "
                              f"{None if action_targets is None else action_targets.shape[0]} action_targets in the batch")
    pred = head(hidden[slots].reshape(n_seq, head.n_slots, hidden.shape[-1]))
    return ce_labels, pred, action_targets.to(pred.dtype)


class RegressionMetrics:
    """parallel_l1's counterpart of ActionMetrics (same summary keys): accuracy = the prediction
    falls in the target's bin (the bins representation's unit), L1 in normalized units; `ce_sum` holds the
    L1 sum so validation's `val_action_loss` is the representation's own loss."""

    def __init__(self, action_tokenizer: ActionTokenizer) -> None:
        self.at = action_tokenizer
        self.reset()

    def reset(self) -> None:
        self.correct, self.constrained_correct, self.total, self.l1_sum, self.ce_sum = 0, 0, 0, 0.0, 0.0

    @torch.no_grad()
    def update_output(self, out, with_loss: bool = False) -> None:
        pred, tgt = getattr(out, "action_pred", None), getattr(out, "action_targets", None)
        if pred is None or tgt is None:
            return
        p, t = pred.detach().float().cpu().numpy(), tgt.detach().float().cpu().numpy()
        err = np.abs(p - t)
        self.correct += int((self.at.encode(p) == self.at.encode(t)).sum())
        self.constrained_correct = self.correct  # no vocabulary to leave: both accuracies are the bin accuracy
        self.total += int(t.size)
        self.l1_sum += float(err.sum())
        self.ce_sum += float(err.sum())

    def summary(self) -> dict[str, float]:
        return metric_summary(self)



class ParallelL1Representation(ActionRepresentation):
    """OpenVLA-OFT's parallel decoding: H x D placeholders, an L1-regression head, one forward.

    With LoRA (OFT's recipe) the head trains in full beside the adapter, as OFT's action head does
    (openvla-oft 213c5ff vla-scripts/finetune.py:847-854 wraps the VLA in LoRA, :927-929 adds the separate
    action head's parameters to the optimizer in full): it is attached to the model under the PEFT wrapper
    (head_host), saved in HEAD_FILE (and in lora.py's non_lora_trainables.bin for resume); the placeholder's
    embedding row is among the token adapter's rows (trained_token_ids: `extra_tokens`), so a loaded adapter
    restores the value it was trained with."""

    name = "parallel_l1"
    extra_tokens = (SLOT_TOKEN,)
    decoding = "placeholders"

    @property
    def n_slots(self) -> int:
        return self.horizon * self.action_dim

    @property
    def answer_tokens(self) -> int:
        return self.n_slots

    def slot_id(self, tokenizer) -> int:
        sid = tokenizer.convert_tokens_to_ids(SLOT_TOKEN)
        if sid is None or sid == tokenizer.unk_token_id:
            raise ActionReprError(f"the tokenizer has no {SLOT_TOKEN}: bind the representation first")
        return int(sid)

    def build(self, prompt_builder, instruction, window):
        window = np.asarray(window, dtype=np.float32)
        if window.shape != (self.horizon, self.action_dim):
            raise ActionReprError(f"action window has shape {window.shape}, expected ({self.horizon}, {self.action_dim})")
        if not np.isfinite(window).all():
            raise ActionReprError(f"non-finite action values: {window[~np.isfinite(window)][:5].tolist()}")
        prompt = prompt_builder.prompt_ids(instruction)
        sid = self.slot_id(prompt_builder.tokenizer)
        input_ids = np.array([*prompt, *([sid] * self.n_slots)], dtype=np.int64)
        labels = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int64)
        labels[len(prompt):] = sid
        return input_ids, labels, {"action_targets": torch.from_numpy(np.clip(window, -1.0, 1.0))}

    def metrics(self):
        return RegressionMetrics(self.action_tokenizer)

    def new_head(self, model, tokenizer) -> L1RegressionHead:
        hidden = int(model.config.hidden_size)
        emb = model.get_input_embeddings().weight
        std = float(emb.detach().float().std()) if emb.numel() else 0.02  # slot embeddings at the vocabulary's scale
        head = L1RegressionHead(hidden, self.action_dim, self.horizon, self.config.head_width or hidden, self.slot_id(tokenizer),
                                slot_init_std=std)
        return head.to(device=emb.device, dtype=emb.dtype)

    def prepare_model(self, model, tokenizer) -> None:
        """A fresh head, and the placeholder's embedding row set to the vocabulary mean, unless the model
        already has a head (continuing from a parallel_l1 checkpoint: loaded from its head file)."""
        model = head_host(model)
        if getattr(model, "vla_action_head", None) is not None:
            return
        source = getattr(model.config, "_name_or_path", "") or ""
        if (Path(source) / HEAD_FILE).exists() and ActionReprConfig.load(source).name == self.name:
            self.load_into(model, tokenizer, source)
            log.warning("parallel_l1: continuing with the action head of %s", source)
            return
        sid = self.slot_id(tokenizer)
        rows = [model.get_input_embeddings().weight]
        out = model.get_output_embeddings()
        if out is not None and out.weight is not rows[0]:
            rows.append(out.weight)
        with gathered(rows), torch.no_grad():
            for p in rows:
                if p.numel():
                    p.data[sid] = p.data[:self.action_tokenizer.token_ids[0]].mean(dim=0).to(p.dtype)
        model.vla_action_head = self.new_head(model, tokenizer)
        log.warning("parallel_l1: new action head (H=%d, D=%d, %d parameters); %s embedding = vocabulary mean",
                    self.horizon, self.action_dim, sum(p.numel() for p in model.vla_action_head.parameters()), SLOT_TOKEN)

    def predict_normalized(self, policy, inputs) -> np.ndarray:
        """One forward pass of the backend (prompt + H*D placeholders -> the head), clamped to [-1, 1]."""
        return np.clip(policy.slot_actions(inputs, self.n_slots), -1.0, 1.0)

    def save(self, directory, model=None, state_dict: Optional[dict] = None) -> None:
        """The config and the head's weights (from the gathered state dict under ZeRO-3, else the model)."""
        from safetensors.torch import save

        super().save(directory)
        prefix = "vla_action_head."  # a LoRA run's state dict names it base_model.model.vla_action_head.*
        if state_dict is not None and any(k.startswith(prefix) or f".{prefix}" in k for k in state_dict):
            weights = {k.split(prefix, 1)[1]: v for k, v in state_dict.items() if k.startswith(prefix) or f".{prefix}" in k}
        elif model is not None and getattr(head_host(model), "vla_action_head", None) is not None:
            weights = head_host(model).vla_action_head.state_dict()
        else:
            raise ActionReprError("parallel_l1 checkpoint without an action head: nothing to save")
        write_bytes(Path(directory) / HEAD_FILE, save({k: v.detach().contiguous().cpu() for k, v in weights.items()},
                    metadata={"slot_token": SLOT_TOKEN, **{k: str(v) for k, v in asdict(self.config).items()}}))

    def load_into(self, model, tokenizer, directory) -> None:
        from safetensors.torch import load_file

        path = Path(directory) / HEAD_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: a parallel_l1 checkpoint carries its action head there "
                                    "(copy it from the run's output directory)")
        head = self.new_head(model, tokenizer)
        head.load_state_dict(load_file(str(path)))
        head_host(model).vla_action_head = head.to(device=model.get_input_embeddings().weight.device)
