"""The action-representation interface, its configuration (saved in every checkpoint) and the head
interface a representation with its own module attaches to the model. Implementations: bins.py,
parallel_l1.py; the registry: registry.py; the overview: this package's docstring."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np
import torch

from data_tools.action_windows import WINDOW_MODES
from data_tools.atomic import write_text
from llava_vla_plugin.core.action_tokenizer import ActionTokenizer
from llava_vla_plugin.core.representations.registry import REPRESENTATIONS, representation_class

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
    # Representation-specific settings (`--vla_repr_options key=value,...`), e.g. fast's `tokenizer=DIR`; checked
    # by the class's `check_options` (preflight, and the class when it is made). Files written before it: {}.
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in REPRESENTATIONS:
            raise ActionReprError(f"unknown action representation {self.name!r}: use one of {', '.join(REPRESENTATIONS)}")
        if self.horizon < 1 or self.action_dim < 1:
            raise ActionReprError(f"horizon and action_dim must be >= 1 (got H={self.horizon}, D={self.action_dim})")
        if self.window_mode not in WINDOW_MODES:
            raise ActionReprError(f"unknown window mode {self.window_mode!r}: use one of {', '.join(WINDOW_MODES)}")
        if not isinstance(self.options, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                          for k, v in self.options.items()):
            raise ActionReprError(f"representation options must map names to strings, got {self.options!r}")
        if self.name == "bins" and self.horizon != 1:
            raise ActionReprError(f"`bins` predicts one step (H=1), got H={self.horizon}: use bins_chunk or parallel_l1 for chunks")

    @classmethod
    def from_args(cls, data_args) -> "ActionReprConfig":
        return cls(name=str(getattr(data_args, "vla_action_repr", "bins")), horizon=int(getattr(data_args, "vla_horizon", 1)),
                   window_mode=str(getattr(data_args, "vla_window_mode", "oft")),
                   options=parse_options(getattr(data_args, "vla_repr_options", None) or ""))

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



def parse_options(text: str) -> dict[str, str]:
    """`--vla_repr_options "key=value,key=value"` -> {key: value} (values are strings; the class checks them)."""
    options: dict[str, str] = {}
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ActionReprError(f"--vla_repr_options: {part!r} is not key=value (e.g. --vla_repr_options tokenizer=DIR)")
        if key.strip() in options:
            raise ActionReprError(f"--vla_repr_options: {key.strip()!r} is given twice")
        options[key.strip()] = value.strip()
    return options


@dataclass(frozen=True)
class TokenPlan:
    """What the pipeline's generation constraint (infer/pipeline.ActionConstraint) allows for a token
    representation: ids first_id .. first_id + n_ids - 1, at most max_tokens of them, then the end token.
    exact=True: exactly max_tokens of them (bins); False: the end may come after the first one (fast)."""

    first_id: int
    n_ids: int
    max_tokens: int
    exact: bool = True


# ---- a head the model carries (parallel_l1's; a new head implements the same four methods) --------
class ActionHead(torch.nn.Module):
    """What a representation with a head attaches as `model.vla_action_head`. The training forward
    (train/sparse_head.py) and the upstream backend's placeholder decoding (infer/upstream_backend.py)
    call only these, so a new head needs no change there.

    The head's answer positions are placeholders (`slot_token_id`) after the prompt: training labels them
    with that id (so they survive upstream's image expansion and padding), decoding appends `n_slots` of
    them and reads the head's output from their last hidden states.
    """

    slot_token_id: int
    n_slots: int

    def slot_embeddings(self, n_seq: int, dtype: torch.dtype) -> torch.Tensor:
        """[n_seq * n_slots, hidden] added to the placeholders' input embeddings (zeros: none)."""
        raise NotImplementedError

    def embed_inputs(self, inputs_embeds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training inputs with the head's additions at its placeholder positions."""
        raise NotImplementedError

    def training_outputs(self, hidden: torch.Tensor, labels: torch.Tensor, action_targets: Optional[torch.Tensor]
                         ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(labels without the placeholder positions for the LM head's cross-entropy, predictions, targets)."""
        raise NotImplementedError

    def loss(self, pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# ---- metrics ------------------------------------------------------------------------------------
def metric_summary(m) -> dict[str, float]:
    """The training-log metric names every representation's metrics share (trainer.METRIC_DOC says what each
    measures): one definition for ActionMetrics and RegressionMetrics."""
    if not m.total:
        return {}
    return {"action_accuracy_teacher_forced": m.correct / m.total,
            "action_accuracy_teacher_forced_constrained": m.constrained_correct / m.total,
            "action_l1": m.l1_sum / m.total}


def head_host(model):
    """The module a representation's head is attached to (`vla_action_head`): the LLaVA model whose forward
    (train/sparse_head.py) and whose `.model` (infer/upstream_backend.py) use it. A PEFT model (LoRA) is unwrapped:
    its LoRA layers sit inside that model, while an attribute set on the wrapper would be invisible to the forward."""
    get_base = getattr(type(model), "get_base_model", None)  # peft.PeftModel; transformers models have none
    return model.get_base_model() if callable(get_base) else model


# ---- the interface --------------------------------------------------------------------------------
class ActionRepresentation:
    """Base: the token-free parts. Subclasses say how targets are made and decoded."""

    name: ClassVar[str] = ""
    extra_tokens: ClassVar[tuple[str, ...]] = ()
    # How actions come out of the model: "tokens" (generate() under the pipeline's constraint, then decode the
    # ids) or "placeholders" (one forward over n_slots placeholders and the model's ActionHead). Backends say
    # which they run (infer/pipeline.py).
    decoding: ClassVar[str] = "tokens"
    # --lora_enable True: PEFT's token adapter trains the rows of `trained_token_ids`, a head (head_host) trains in
    # full beside the adapter; False where that does not cover what the representation trains (the trainer refuses)
    supports_lora: ClassVar[bool] = True

    def __init__(self, config: ActionReprConfig, action_tokenizer: Optional[ActionTokenizer] = None,
                 directory: Optional[str] = None):
        """`directory`: where the representation's own checkpoint files are (a checkpoint being read), if any."""
        self.config = config
        self.directory = directory
        self.action_tokenizer = action_tokenizer or ActionTokenizer(n_bins=config.n_bins, action_dim=config.action_dim)
        if self.action_tokenizer.action_dim != config.action_dim:
            raise ActionReprError(f"action tokenizer has D={self.action_tokenizer.action_dim}, representation D={config.action_dim}")

    @classmethod
    def check_options(cls, config: ActionReprConfig) -> None:
        """Raise ActionReprError (what is wrong and what to do) if `config.options` does not suit this class
        (preflight calls it before anything loads). Default: no options."""
        if config.options:
            raise ActionReprError(f"--vla_action_repr {config.name} takes no --vla_repr_options "
                                  f"(got {', '.join(config.options)})")

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

    def trained_token_ids(self, tokenizer) -> list[int]:
        """The embedding rows this representation trains: the action tokens' and its `extra_tokens`' (a LoRA run
        makes exactly these rows trainable through PEFT's token adapter, which saves their values in the adapter)."""
        ids = [int(i) for i in self.action_tokenizer.token_ids]
        for token in self.extra_tokens:
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ActionReprError(f"the tokenizer has no {token}: bind the representation first")
            ids.append(int(tid))
        return ids

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
    def token_plan(self, tokenizer) -> Optional[TokenPlan]:
        """The ids generation may pick for `decoding = "tokens"` (None: no tokens are generated)."""
        return None

    def predict_normalized(self, policy, inputs) -> np.ndarray:
        """Normalized actions [B, H, D] for prepared policy inputs."""
        raise NotImplementedError

    def describe(self) -> str:
        """The representation in one line, as every report row names it (offline eval, closed-loop report,
        benchmarks): `bins`, `bins_chunk H=8 (oft windows)`, ..."""
        c = self.config
        return c.name if c.horizon == 1 else f"{c.name} H={c.horizon} ({c.window_mode} windows)"

    # -- checkpoint --
    def save(self, directory, model=None, state_dict: Optional[dict] = None) -> None:
        self.config.save(directory)

    def load_into(self, model, tokenizer, directory) -> None:
        """Attach what the checkpoint carries beyond upstream's files (the parallel_l1 head)."""




def make_representation(config: ActionReprConfig, action_tokenizer: Optional[ActionTokenizer] = None,
                        directory=None) -> ActionRepresentation:
    """The configured representation; `directory`: the checkpoint it is read from (its own files, e.g. fast's
    vla_fast_tokenizer.json), None when training from options."""
    return representation_class(config.name)(config, action_tokenizer, directory=None if directory is None else str(directory))


def with_horizon(config: ActionReprConfig, horizon: int) -> ActionReprConfig:
    return replace(config, horizon=horizon)
