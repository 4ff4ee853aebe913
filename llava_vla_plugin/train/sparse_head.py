"""Training forward that runs the LM head only where there are labels.

Upstream's forward projects every position onto the 151,936-id vocabulary: with ~730-3000 visual +
text positions that is 0.5-1.8 GB of fp32 logits per sample, while a VLA sample has 8 labelled
positions. The loss (mean cross-entropy over labelled tokens) is the same number; the logits
returned are those of the labelled positions only, shape [n_labelled, vocab].
The output also carries what the trainer's metrics need and only the forward knows: the targets of
those positions (aligned with the logits) and the number of sequence positions processed (visual + text,
for the tokens/compute axes of scaling studies). Generation, DPO and label-free calls use upstream's
forward unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from data_tools.converted_format import IGNORE_INDEX


@dataclass
class SparseHeadOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast with `logits` of the labelled positions only, plus their `targets` and the
    number of attended sequence positions (`num_tokens`) and sequences (`num_sequences`) of the batch."""

    targets: Optional[torch.LongTensor] = None
    target_rows: Optional[torch.LongTensor] = None  # the batch row of each labelled position (per-dataset metrics)
    action_pred: Optional[torch.FloatTensor] = None  # a representation's ActionHead (parallel_l1): [n, H, D]
    action_targets: Optional[torch.FloatTensor] = None
    num_tokens: Optional[int] = None
    num_sequences: Optional[int] = None


def install(model_cls) -> None:
    upstream_forward = model_cls.forward

    def forward(
        self,
        input_ids: torch.LongTensor = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[List[torch.FloatTensor]] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        images: Optional[torch.FloatTensor] = None,
        image_sizes: Optional[List[List[int]]] = None,
        return_dict: Optional[bool] = None,
        modalities: Optional[List[str]] = ["image"],
        dpo_forward: Optional[bool] = False,
        cache_position=None,
        action_targets: Optional[torch.FloatTensor] = None,
    ):
        if labels is None or dpo_forward:
            return upstream_forward(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, labels,
                                    use_cache, output_attentions, output_hidden_states, images, image_sizes, return_dict,
                                    modalities, dpo_forward, cache_position)
        if inputs_embeds is None:
            (input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, labels) = self.prepare_inputs_labels_for_multimodal(
                input_ids, position_ids, attention_mask, past_key_values, labels, images, modalities, image_sizes)
        head = getattr(self, "vla_action_head", None)  # a representation's ActionHead (core/representations/base.py)
        if head is not None:  # e.g. parallel_l1's learned slot embeddings at its placeholders
            inputs_embeds = head.embed_inputs(inputs_embeds, labels)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=False,
                             output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True)
        action_pred = None
        if head is not None:  # placeholder positions go to the head, not the LM head
            labels, action_pred, action_targets = head.training_outputs(outputs.last_hidden_state, labels, action_targets)
        targets, logits = labelled_logits(self.lm_head, outputs.last_hidden_state, labels)
        target_rows = labelled_rows(labels)
        loss = F.cross_entropy(logits.float(), targets) if targets.numel() else logits.sum() * 0.0
        if action_pred is not None:
            loss = loss + head.loss(action_pred, action_targets)
        counted = attention_mask is not None
        return SparseHeadOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                                targets=targets, target_rows=target_rows, action_pred=action_pred, action_targets=action_targets if action_pred is not None else None,
                                num_tokens=int(attention_mask.sum()) if counted else None,
                                num_sequences=int(attention_mask.shape[0]) if counted else None)

    forward.__doc__ = upstream_forward.__doc__
    forward.__wrapped_upstream__ = upstream_forward  # for benchmarks and tests that compare the two
    model_cls.forward = forward


def labelled_rows(labels: torch.Tensor) -> torch.Tensor:
    """The batch row of each position labelled_logits selects, in its order (row-major boolean indexing): what
    lets validation split one batch's metrics by the dataset of each sample (trainer.run_validation)."""
    return (labels[:, 1:] != IGNORE_INDEX).nonzero()[:, 0]


def labelled_logits(lm_head, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position t predicts token t+1: select hidden states whose next label is not ignored."""
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    return shift_labels[mask], lm_head(hidden[:, :-1][mask])
