"""`fast`: FAST action tokens (Pertsch et al. 2025; the codec is core/fast_codec.py), autoregressive.

A normalized window [H, D] becomes a short BPE sequence over the codec's vocabulary; each BPE index i is the
LM token `<FAST_i>`, added to the tokenizer as a special token after the bins' `<ACTION_k>` (contiguous new ids,
never Qwen's own ids, as `<ACTION_k>` for bins). The answer is those tokens and `<|im_end|>`; the length varies
per window, which is the point (a smooth chunk compresses to a few tokens).

Where the codec comes from: training reads it from `--vla_repr_options tokenizer=DIR` (DIR: what `vla-fit-fast`
wrote); the checkpoint carries it as `vla_fast_tokenizer.json` (core/checkpoint.POLICY_FILES, so LoRA merges and
exports carry it) and a checkpoint being read (`directory`) prefers that copy: the path in the options is the
training machine's.

Decoding: generation may pick `<FAST_i>` ids or `<|im_end|>` (the first token must be a FAST id), at most
`answer_tokens - 1` of them, then only the end (pipeline.ActionConstraint with TokenPlan(exact=False)). An
invalid sequence (not H x D coefficients) decodes to zeros [H, D], the reference's rule; the policy counts
them in `policy.decode_failures` and logs the reason, never raising (a server keeps serving).

With --lora_enable True the token adapter trains the `<FAST_i>` rows too (`trained_token_ids`: the action
tokens' and the FAST tokens'), so the adapter carries their values; prepare_model runs before the adapter
exists and grows the base model's embedding where the tokenizer no longer fits it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from llava_vla_plugin.core.fast_codec import FILE_NAME as FAST_FILE
from llava_vla_plugin.core.fast_codec import DecodeResult, FastCodec, FastCodecError
from llava_vla_plugin.core.representations.base import (ActionRepresentation, ActionReprConfig, ActionReprError,
                                                        TokenPlan, metric_summary)
from llava_vla_plugin.core.zero import gathered

log = logging.getLogger(__name__)

FIT_HINT = ("fit one with `vla-fit-fast --data_path MIXTURE.yaml --horizon H --out DIR` (python -m "
            "llava_vla_plugin.train.fit_fast, the training mixture and HORIZON / WINDOW_MODE of this run) and pass "
            "`--vla_repr_options tokenizer=DIR` (launcher: REPR_OPTIONS=tokenizer=DIR)")


def _load_codec(config: ActionReprConfig, directory: Optional[str]) -> tuple[FastCodec, str]:
    """The checkpoint's copy (directory/vla_fast_tokenizer.json) if there is one, else options["tokenizer"];
    its H and D must be the run's."""
    if directory is not None and (Path(directory) / FAST_FILE).is_file():
        source = str(Path(directory) / FAST_FILE)
    elif config.options.get("tokenizer"):
        source = config.options["tokenizer"]
    else:
        where = f"{directory} has no {FAST_FILE} and " if directory is not None else ""
        raise ActionReprError(f"--vla_action_repr fast needs a FAST tokenizer ({where}no --vla_repr_options "
                              f"tokenizer=DIR was given): {FIT_HINT}")
    try:
        codec = FastCodec.load(source)
    except FastCodecError as e:
        raise ActionReprError(f"--vla_repr_options tokenizer={source}: {e}") from None
    c = codec.config
    if (c.horizon, c.action_dim) != (config.horizon, config.action_dim):
        raise ActionReprError(f"the FAST tokenizer {source} was fitted for H={c.horizon}, D={c.action_dim}, this run has "
                              f"H={config.horizon} (HORIZON / --vla_horizon), D={config.action_dim}: refit it with "
                              f"--horizon {config.horizon}, or set HORIZON={c.horizon}")
    return codec, source


def _max_bytes_per_char(alphabet_size: int) -> int:
    """UTF-8 bytes of the largest coefficient character: the ByteLevel BPE works on bytes, so a token covers at
    least one byte and a chunk of H x D characters is at most H x D x this many tokens."""
    return len(chr(max(alphabet_size - 1, 0)).encode("utf-8"))


class FastMetrics:
    """fast's counterpart of ActionMetrics (same summary keys, trainer.METRIC_DOC), over the labelled `<FAST_i>`
    positions (the closing `<|im_end|>` is not counted, as for bins):

      correct / total               argmax over the whole vocabulary == the target FAST token (teacher forced)
      constrained_correct / total   argmax over the FAST rows only == the target
      l1_sum / total                per labelled span (one sample's answer): the mean |decode(argmax FAST ids of
                                    the span) - decode(target ids)| over its H x D values, normalized units,
                                    weighted by the span's token count (so validation's sum / token count is the
                                    token-weighted mean). Teacher forced, so the predicted span has the target's
                                    length; a prediction that is not a valid sequence counts as the zeros chunk it
                                    decodes to (what a robot would get), and is counted in `invalid_decodes`.
                                    The target's decode is the quantized window (within the codec's
                                    round_trip_bound of the data), so this is the model's error in FAST's units.
    Spans are cut at the `<|im_end|>` targets: SparseHeadOutput's targets are every labelled position of the
    batch in order, each answer ending with `<|im_end|>`.
    """

    def __init__(self, representation: "FastRepresentation") -> None:
        self.rep = representation
        self.reset()

    def reset(self) -> None:
        self.correct = 0
        self.constrained_correct = 0
        self.total = 0
        self.l1_sum = 0.0
        self.ce_sum = 0.0
        self.invalid_decodes = 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor, with_loss: bool = False) -> None:
        first, n = self.rep.first_fast_id, self.rep.codec.n_tokens
        if first is None:
            return
        mask = (targets >= first) & (targets < first + n)
        if not mask.any():
            return
        pos_logits = logits[mask]
        pred_ids = pos_logits.argmax(-1)
        pred_fast = pos_logits[:, first:first + n].argmax(-1)
        self.correct += int((pred_ids == targets[mask]).sum())
        self.constrained_correct += int((pred_fast == targets[mask] - first).sum())
        self.total += int(mask.sum())
        if with_loss:
            self.ce_sum += float(F.cross_entropy(pos_logits.float(), targets[mask], reduction="sum"))
        # spans: runs of FAST targets (each answer's FAST tokens, closed by a non-FAST target: <|im_end|>)
        fast_targets = (targets[mask] - first).cpu().numpy()
        preds = pred_fast.cpu().numpy()
        idx = np.flatnonzero(mask.cpu().numpy())
        breaks = np.flatnonzero(np.diff(idx) > 1) + 1
        for span in np.split(np.arange(len(idx)), breaks):
            want = self.rep.codec.decode(fast_targets[span], self.rep.horizon, self.rep.action_dim)
            got = self.rep.codec.decode(preds[span], self.rep.horizon, self.rep.action_dim)
            self.invalid_decodes += not got.ok
            self.l1_sum += float(np.abs(got.actions - want.actions).mean()) * len(span)

    def update_output(self, out, with_loss: bool = False) -> None:
        """From a sparse_head.SparseHeadOutput (the interface every representation's metrics share)."""
        targets, logits = getattr(out, "targets", None), getattr(out, "logits", None)
        if targets is not None and logits is not None:
            self.update(logits.detach(), targets.to(logits.device), with_loss=with_loss)

    def summary(self) -> dict[str, float]:
        return metric_summary(self)


class FastRepresentation(ActionRepresentation):
    """FAST tokens `<FAST_i>` then `<|im_end|>`, autoregressive, variable length (module docstring)."""

    name = "fast"
    decoding = "tokens"

    def __init__(self, config: ActionReprConfig, action_tokenizer=None, directory: Optional[str] = None):
        super().__init__(config, action_tokenizer, directory=directory)
        self.codec, self.codec_source = _load_codec(config, directory)
        self.first_fast_id: Optional[int] = None
        self._new_rows: list[int] = []  # ids this instance added to a tokenizer: prepare_model initialises them
        self.clipped_windows = 0
        self.clipped_coefficients = 0
        self.clipped_predictions = 0  # decoded values outside [-1, 1] (predict_normalized)

    @classmethod
    def check_options(cls, config: ActionReprConfig) -> None:
        """tokenizer=DIR (or the file) is required, and must be a FAST tokenizer for the run's H and D."""
        unknown = sorted(set(config.options) - {"tokenizer"})
        if unknown:
            raise ActionReprError(f"--vla_repr_options: fast knows only tokenizer=DIR, got {', '.join(unknown)}")
        _load_codec(config, None)

    # -- model / tokenizer --
    @property
    def max_fast_tokens(self) -> int:
        """A safe bound on FAST tokens per chunk: H x D coefficient characters, each at most this many bytes."""
        c = self.codec.config
        return c.horizon * c.action_dim * _max_bytes_per_char(c.alphabet_size)

    @property
    def answer_tokens(self) -> int:
        return self.max_fast_tokens + 1  # + <|im_end|>

    def fast_ids(self, tokenizer) -> int:
        """The first `<FAST_i>` id, checking that all n of them are in the tokenizer with contiguous ids."""
        strings = self.codec.token_strings()
        ids = tokenizer.convert_tokens_to_ids(strings)
        unk = tokenizer.unk_token_id
        if any(i is None or (unk is not None and i == unk) for i in ids):
            raise ActionReprError(f"the tokenizer lacks the FAST tokens ({strings[0]}..{strings[-1]}): a fast checkpoint's "
                                  "tokenizer carries them (bind the representation when training)")
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise ActionReprError(f"the FAST tokens' ids are not contiguous ({ids[0]}..{ids[-1]} for {len(ids)} tokens): "
                                  "some were in the tokenizer already; start from a tokenizer without <FAST_*> tokens")
        self.first_fast_id = int(ids[0])
        return self.first_fast_id

    def trained_token_ids(self, tokenizer) -> list[int]:
        """The action tokens' rows and every `<FAST_i>` row (LoRA's token adapter trains these)."""
        first = self.fast_ids(tokenizer)
        return [*super().trained_token_ids(tokenizer), *range(first, first + len(self.codec.token_strings()))]

    def bind(self, tokenizer) -> int:
        """The bins' tokens (base), then `<FAST_0>..<FAST_{n-1}>` as added special tokens (idempotent)."""
        added = super().bind(tokenizer)
        strings = self.codec.token_strings()
        vocab = tokenizer.get_vocab()
        missing = [t for t in strings if t not in vocab]
        if missing and len(missing) != len(strings):
            raise ActionReprError(f"the tokenizer has {len(strings) - len(missing)} of the {len(strings)} FAST tokens: "
                                  "it was bound to a different FAST tokenizer; start from the base model's tokenizer")
        if missing:
            added += tokenizer.add_tokens(missing, special_tokens=True)
        first = self.fast_ids(tokenizer)
        if missing:
            self._new_rows = list(range(first, first + len(strings)))
        return added

    def prepare_model(self, model, tokenizer) -> None:
        """Embedding rows for the FAST tokens this run added (the vocabulary mean, as the bins' rows start);
        the embedding grows only when the tokenizer no longer fits its rows. Rows of tokens the tokenizer had
        already (continuing from a fast checkpoint) keep their trained values."""
        if not self._new_rows:
            return
        emb = model.get_input_embeddings().weight
        rows = emb.ds_shape[0] if hasattr(emb, "ds_shape") else emb.shape[0]
        if self._new_rows[-1] >= rows:
            model.resize_token_embeddings(len(tokenizer))
        params = [model.get_input_embeddings().weight]
        out = model.get_output_embeddings()
        if out is not None and out.weight is not params[0]:
            params.append(out.weight)
        new = slice(self._new_rows[0], self._new_rows[-1] + 1)
        with gathered(params), torch.no_grad():
            for p in params:
                if p.numel():
                    p.data[new] = p.data[:int(self.action_tokenizer.token_ids[0])].mean(dim=0).to(p.dtype)
        log.warning("fast: %d FAST tokens (ids %d..%d), embeddings initialised to the vocabulary mean",
                    len(self._new_rows), self._new_rows[0], self._new_rows[-1])
        self._new_rows = []

    # -- training targets --
    def build(self, prompt_builder, instruction, window):
        """prompt + FAST ids + answer suffix; labels: the FAST ids and `<|im_end|>` (as bins). A window whose
        coefficients leave the fitted range is clipped by the codec: counted and logged, never silent."""
        window = np.asarray(window)
        if window.shape != (self.horizon, self.action_dim):
            raise ActionReprError(f"action window has shape {window.shape}, expected ({self.horizon}, {self.action_dim})")
        if self.first_fast_id is None:
            self.fast_ids(prompt_builder.tokenizer)
        try:
            report = self.codec.encode_report(window)
        except FastCodecError as e:
            raise ActionReprError(f"fast: {e}") from None
        if report.clipped:
            self.clipped_windows += 1
            self.clipped_coefficients += report.clipped
            if self.clipped_windows <= 10 or self.clipped_windows % 1000 == 0:
                log.warning("fast: %d DCT coefficient(s) of a training window fell outside the FAST tokenizer's fitted "
                            "range and were clipped (%d windows, %d coefficients so far; %s): refit the tokenizer on "
                            "this run's data", report.clipped, self.clipped_windows, self.clipped_coefficients,
                            self.codec_source)
        prompt = prompt_builder.prompt_ids(instruction)
        answer = [self.first_fast_id + t for t in report.tokens]
        input_ids = np.array([*prompt, *answer, *prompt_builder.answer_suffix], dtype=np.int64)
        from data_tools.converted_format import IGNORE_INDEX

        labels = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int64)
        labels[len(prompt):len(prompt) + len(answer) + 1] = input_ids[len(prompt):len(prompt) + len(answer) + 1]
        return input_ids, labels, {}

    def metrics(self):
        return FastMetrics(self)

    # -- decoding --
    def token_plan(self, tokenizer) -> TokenPlan:
        return TokenPlan(self.fast_ids(tokenizer), self.codec.n_tokens, self.max_fast_tokens, exact=False)

    def decode_ids(self, ids, end_id: int) -> DecodeResult:
        """Generated LM ids of one row -> the codec's DecodeResult: cut at the first end id, FAST indices."""
        ids = np.asarray(ids).reshape(-1)
        ends = np.flatnonzero(ids == end_id)
        ids = ids[:ends[0]] if len(ends) else ids
        return self.codec.decode((ids - self.first_fast_id).tolist(), self.horizon, self.action_dim)

    def predict_normalized(self, policy, inputs) -> np.ndarray:
        """Greedy generation under the FAST plan, then the codec's decode per row. An invalid sequence gives zeros
        [H, D] (the reference's rule), counted in `policy.decode_failures` and logged with the reason."""
        if self.first_fast_id is None:
            self.fast_ids(policy.tokenizer)
        new = policy.generate_ids(inputs)
        new = new.cpu().numpy() if hasattr(new, "cpu") else np.asarray(new)
        out = np.zeros((len(new), self.horizon, self.action_dim), dtype=np.float32)
        for row, ids in enumerate(new):
            result = self.decode_ids(ids, policy.end_id)
            if not result.ok:
                policy.decode_failures = getattr(policy, "decode_failures", 0) + 1
                log.warning("fast: invalid FAST sequence (%s); answering zeros (%d invalid so far)", result.reason,
                            policy.decode_failures)
            out[row] = result.actions
        # a valid sequence can still decode a little past the normalized range (the rounding of the coefficients);
        # the statistics un-normalize [-1, 1], so values outside are clipped, counted and logged
        outside = int((np.abs(out) > 1.0).sum())
        if outside:
            self.clipped_predictions += outside
            log.warning("fast: %d decoded value(s) outside [-1, 1] clipped (%d so far)", outside, self.clipped_predictions)
        return np.clip(out, -1.0, 1.0)

    def describe(self) -> str:
        return f"{super().describe()}, {self.codec.n_tokens} FAST tokens"

    # -- checkpoint --
    def save(self, directory, model=None, state_dict=None) -> None:
        """The config and the codec (`vla_fast_tokenizer.json`), so the checkpoint decodes on its own."""
        super().save(directory)
        self.codec.save(directory)
