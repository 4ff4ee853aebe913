"""Action representations: how normalized actions [H, D] become training targets and come back out.

One interface, three implementations, chosen by one training option (`--vla_action_repr`), recorded in
every checkpoint (`vla_action_repr.json`). The model sees the same data and backbone whichever is used;
a representation answers four questions (openpi's tokenizers `tokenize` / `extract_actions` are the model):

  targets       normalized window [H, D] -> input_ids, labels (+ regression targets) after the prompt
  model         which tokens the tokenizer needs and which head (if any) the model carries
  decoding      how the policy turns a prompt into normalized actions [B, H, D] (and what it constrains)
  metrics       how action accuracy / L1 are counted in training and validation

Registry (data, not an if-chain): REPRESENTATIONS = {name: class}.

* ``bins`` -- today's OpenVLA-style step: D tokens `<ACTION_k>` (256 uniform bins over [-1, 1]) and
  `<|im_end|>`, autoregressive, H = 1. Byte-identical to the behaviour before this module existed.
* ``bins_chunk`` -- H x D action tokens (step-major), autoregressive; decoding is constrained to action
  tokens for H x D steps, then `<|im_end|>`.
* ``parallel_l1`` -- OpenVLA-OFT's parallel decoding: H x D placeholder positions (`<ACTION_SLOT>`, each
  plus its own learned slot embedding) follow the prompt; one forward pass gives their last hidden states,
  a small MLP head maps each step's D hidden states to D continuous normalized values, trained with L1
  loss. No LM head, no sampling, no KV cache.
  Attention among the placeholders stays *causal* (OFT makes it bidirectional). Why: every placeholder
  attends to the whole prompt (image and instruction) either way, and the head reads all H x D positions,
  so the chunk is decoded as a whole; causal attention keeps the checkpoint an ordinary causal LM that
  plain upstream LLaVA-NeXT loads, and keeps upstream's attention kernels (sdpa / flash-attention, whose
  causal mask cannot be mixed per span), gradient checkpointing and DeepSpeed paths unchanged. What
  causal attention alone does not give is distinct inputs: identical placeholder tokens differ only by
  RoPE's relative positions, and a small LM then tells the steps apart poorly (measured on the 2-layer test
  model, tests/test_action_chunks.py's task: without slot embeddings 0.30 of held-out values within one bin
  after 60 steps, mean errors per step 0.11 / 0.04 / 0.39 / 0.04; with the learned slot embeddings
  (L1RegressionHead.slots, DETR-style queries) 0.65-0.69 after 40 steps, errors 0.010-0.015 on every step).
  A bidirectional variant is a custom 4-d mask in the forward and is left as an ablation.
  The head travels in the checkpoint as `vla_action_head.safetensors` (and inside model.safetensors,
  which plain upstream ignores with an "unused weights" notice; resume restores it from there).
  Not with --lora_enable True (refused by the trainer: the head is not part of the adapter).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np
import torch
import torch.nn.functional as F

from data_tools.action_windows import WINDOW_MODES
from data_tools.atomic import write_bytes, write_text
from data_tools.converted_format import IGNORE_INDEX
from llava_vla_plugin.core.action_tokenizer import ActionTokenizer
from llava_vla_plugin.core.zero import gathered

log = logging.getLogger(__name__)

REPR_FILE = "vla_action_repr.json"
HEAD_FILE = "vla_action_head.safetensors"
SLOT_TOKEN = "<ACTION_SLOT>"
# system + user framing + `<|im_start|>assistant\n` + `<|im_end|>\n` after the answer, without instruction/actions
PROMPT_FRAMING_TOKENS = 40


class ActionReprError(ValueError):
    pass


# ---- configuration (saved in every checkpoint) ---------------------------------------------------
@dataclass(frozen=True)
class ActionReprConfig:
    """What a checkpoint needs to decode its actions. Old checkpoints (no file) are `bins`, H = 1."""

    name: str = "bins"
    action_dim: int = 7
    horizon: int = 1
    window_mode: str = "oft"  # how training windows were cut (data_tools.action_windows); documentation at inference
    n_bins: int = 256
    head_width: Optional[int] = None  # parallel_l1: MLP width (None: the LM's hidden size)
    version: int = 1

    def __post_init__(self) -> None:
        if self.name not in REPRESENTATIONS:
            raise ActionReprError(f"unknown action representation {self.name!r}: use one of {', '.join(REPRESENTATIONS)}")
        if self.horizon < 1 or self.action_dim < 1:
            raise ActionReprError(f"horizon and action_dim must be >= 1 (got H={self.horizon}, D={self.action_dim})")
        if self.window_mode not in WINDOW_MODES:
            raise ActionReprError(f"unknown window mode {self.window_mode!r}: use one of {', '.join(WINDOW_MODES)}")
        if self.name == "bins" and self.horizon != 1:
            raise ActionReprError(f"`bins` predicts one step (H=1), got H={self.horizon}: use bins_chunk or parallel_l1 for chunks")

    @classmethod
    def from_args(cls, data_args) -> "ActionReprConfig":
        return cls(name=str(getattr(data_args, "vla_action_repr", "bins")), horizon=int(getattr(data_args, "vla_horizon", 1)),
                   window_mode=str(getattr(data_args, "vla_window_mode", "oft")))

    def save(self, directory) -> Path:
        path = Path(directory) / REPR_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, directory) -> "ActionReprConfig":
        """The checkpoint's representation; a checkpoint written before representations existed is `bins`,
        H = 1, with the action tokenizer's dimension and bin count."""
        directory = Path(directory)
        path = directory / REPR_FILE
        if not path.exists():
            at = ActionTokenizer.load(directory)
            return cls(name="bins", action_dim=at.action_dim, horizon=1, n_bins=at.n_bins)
        d = json.loads(path.read_text())
        try:
            return cls(**d)
        except TypeError as e:
            raise ActionReprError(f"{path}: {e} (written by a newer llava_vla_plugin?)") from None


# ---- the parallel_l1 head ------------------------------------------------------------------------
class L1RegressionHead(torch.nn.Module):
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


# ---- metrics ------------------------------------------------------------------------------------
def metric_summary(m) -> dict[str, float]:
    """The training-log metric names every representation's metrics share (trainer.METRIC_DOC says what each
    measures): one definition for ActionMetrics and RegressionMetrics."""
    if not m.total:
        return {}
    return {"action_accuracy_teacher_forced": m.correct / m.total,
            "action_accuracy_teacher_forced_constrained": m.constrained_correct / m.total,
            "action_l1": m.l1_sum / m.total}


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


# ---- the interface --------------------------------------------------------------------------------
class ActionRepresentation:
    """Base: the token-free parts. Subclasses say how targets are made and decoded."""

    name: ClassVar[str] = ""
    extra_tokens: ClassVar[tuple[str, ...]] = ()
    # --lora_enable True: the adapter, its action-token rows and lora.py's save/merge/load know token heads only
    supports_lora: ClassVar[bool] = True

    def __init__(self, config: ActionReprConfig, action_tokenizer: Optional[ActionTokenizer] = None):
        self.config = config
        self.action_tokenizer = action_tokenizer or ActionTokenizer(n_bins=config.n_bins, action_dim=config.action_dim)
        if self.action_tokenizer.action_dim != config.action_dim:
            raise ActionReprError(f"action tokenizer has D={self.action_tokenizer.action_dim}, representation D={config.action_dim}")

    @property
    def horizon(self) -> int:
        return self.config.horizon

    @property
    def action_dim(self) -> int:
        return self.config.action_dim

    # -- model / tokenizer --
    def bind(self, tokenizer) -> int:
        """Add the representation's tokens to the tokenizer (idempotent); returns how many were new."""
        added = self.action_tokenizer.add_to_tokenizer(tokenizer)
        missing = [t for t in self.extra_tokens if t not in tokenizer.get_vocab()]
        if missing:
            added += tokenizer.add_tokens(missing, special_tokens=True)
        return added

    @property
    def answer_tokens(self) -> int:
        """Tokens after the prompt in a training sample (the max-length guard adds them to the framing)."""
        raise NotImplementedError

    def prepare_model(self, model, tokenizer) -> None:
        """Give the model what the representation needs before training (a head, new embedding rows)."""

    # -- training targets --
    def build(self, prompt_builder, instruction: str, window: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        raise NotImplementedError

    def metrics(self):
        raise NotImplementedError

    # -- decoding --
    def predict_normalized(self, policy, inputs) -> np.ndarray:
        """Normalized actions [B, H, D] for prepared policy inputs."""
        raise NotImplementedError

    # -- checkpoint --
    def save(self, directory, model=None, state_dict: Optional[dict] = None) -> None:
        self.config.save(directory)

    def load_into(self, model, tokenizer, directory) -> None:
        """Attach what the checkpoint carries beyond upstream's files (the parallel_l1 head)."""


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

    def predict_normalized(self, policy, inputs) -> np.ndarray:
        ids = policy.action_ids_from_inputs(inputs)
        return self.action_tokenizer.decode_ids(ids).reshape(len(ids), self.horizon, self.action_dim)


class BinsChunkRepresentation(BinsRepresentation):
    """H x D action tokens (step-major), autoregressive, decoding constrained to action tokens; HORIZON > 1."""

    name = "bins_chunk"


class ParallelL1Representation(ActionRepresentation):
    """OpenVLA-OFT's parallel decoding: H x D placeholders, an L1-regression head, one forward; no LoRA yet."""

    name = "parallel_l1"
    extra_tokens = (SLOT_TOKEN,)
    # Not yet: the head would sit on the PEFT wrapper (the forward looks for it on the base model), the slot
    # token's row would stay frozen, and lora.py's merge/load would drop the head file. Refused, not half-done.
    supports_lora = False

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
        prefix = "vla_action_head."
        if state_dict is not None and any(k.startswith(prefix) for k in state_dict):
            weights = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        elif model is not None and getattr(model, "vla_action_head", None) is not None:
            weights = model.vla_action_head.state_dict()
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
        model.vla_action_head = head.to(device=model.get_input_embeddings().weight.device)


REPRESENTATIONS: dict[str, type[ActionRepresentation]] = {
    "bins": BinsRepresentation,
    "bins_chunk": BinsChunkRepresentation,
    "parallel_l1": ParallelL1Representation,
}


def make_representation(config: ActionReprConfig, action_tokenizer: Optional[ActionTokenizer] = None) -> ActionRepresentation:
    return REPRESENTATIONS[config.name](config, action_tokenizer)


def with_horizon(config: ActionReprConfig, horizon: int) -> ActionReprConfig:
    return replace(config, horizon=horizon)
