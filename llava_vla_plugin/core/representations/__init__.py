"""Action representations: how normalized actions [H, D] become training targets and come back out.

One interface, three implementations, chosen by one training option (`--vla_action_repr`), recorded in
every checkpoint (`vla_action_repr.json`). The model sees the same data and backbone whichever is used;
a representation answers four questions (openpi's tokenizers `tokenize` / `extract_actions` are the model):

  targets       normalized window [H, D] -> input_ids, labels (+ regression targets) after the prompt
  model         which tokens the tokenizer needs and which head (if any) the model carries
  decoding      how the policy turns a prompt into normalized actions [B, H, D] (and what it constrains)
  metrics       how action accuracy / L1 are counted in training and validation

Registry (data, not an if-chain): registry.REPRESENTATIONS = {name: "module:Class"}; one module per
representation in this package (base.py: the interface, bins.py, parallel_l1.py).

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
  With --lora_enable True (OFT's recipe) the head trains in full beside the adapter (parallel_l1.py says how).
"""
from llava_vla_plugin.core.representations.base import (HEAD_FILE, PROMPT_FRAMING_TOKENS, REPR_FILE, SLOT_TOKEN,  # noqa: F401
                                                        ActionHead, ActionRepresentation, ActionReprConfig, head_host,
                                                        ActionReprError, TokenPlan, make_representation, metric_summary,
                                                        parse_options, with_horizon)
from llava_vla_plugin.core.representations.registry import REPRESENTATIONS, representation_class  # noqa: F401
