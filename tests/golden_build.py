"""Builds the golden checkpoints of tests/test_golden.py (run in a subprocess: HF_HOME must point at
the tiny tower before transformers is imported).

    python tests/golden_build.py TINY_LLAVA_DIR OUT REPR HORIZON STATS_JSON (generate|weights)

A golden checkpoint is the shared tiny model (seeded) with its action-token rows (and the
parallel_l1 slot row) set from a seeded numpy generator, so that constrained decoding has a clear
winner at every step (rows at the vocabulary mean, as training starts them, would all tie), plus
the VLA files. `generate` writes every file with today's writers; the small ones are committed
under tests/fixtures/ckpt_v1/<repr>/ (weights, the head's included, are rebuilt, not committed).
`weights` writes only what is rebuilt (model.safetensors, the tokenizer and parallel_l1's head file), and
the test copies the committed files over it: the checkpoint a reader gets is then the one today's main wrote.
"""
from __future__ import annotations

import json
import sys

ROW_SEED = 1234
ROW_SCALE = 4.0  # x the embedding's std: well-separated action logits (no near-ties between bins)


def build(tiny: str, out: str, repr_name: str, horizon: int, stats_path: str, mode: str) -> None:
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from llava_vla_plugin.train import register
    from llava_vla_plugin.core.representations import ActionReprConfig, make_representation
    from llava_vla_plugin.core.action_tokenizer import ActionTokenizer

    register.register()
    from llava.model.language_model.llava_qwen import LlavaQwenForCausalLM

    torch.manual_seed(0)
    model = LlavaQwenForCausalLM.from_pretrained(tiny, attn_implementation="sdpa", torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    action_tokenizer = ActionTokenizer()
    rep = make_representation(ActionReprConfig(name=repr_name, horizon=horizon), action_tokenizer)
    rep.bind(tokenizer)
    register.add_action_tokens(model, tokenizer)
    rep.prepare_model(model, tokenizer)  # parallel_l1: the slot row and a fresh head (torch-seeded above)
    ids = [int(i) for i in action_tokenizer.token_ids] + [tokenizer.convert_tokens_to_ids(t) for t in rep.extra_tokens]
    emb = model.get_input_embeddings().weight
    rng = np.random.default_rng(ROW_SEED)
    with torch.no_grad():
        std = float(emb[: ids[0]].std())
        rows = torch.from_numpy(rng.normal(0.0, ROW_SCALE * std, (len(ids), emb.shape[1])).astype(np.float32))
        emb[ids] = emb[: ids[0]].mean(0) + rows  # tied: the LM head sees the same rows
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if mode == "generate":
        from llava_vla_plugin.train.trainer import write_vla_files

        write_vla_files(out, action_tokenizer, json.loads(open(stats_path).read()), action_repr=rep, model=model)
    elif getattr(model, "vla_action_head", None) is not None:
        rep.save(out, model=model)  # parallel_l1's head file (seeded above): weights are rebuilt, never committed


if __name__ == "__main__":
    tiny, out, repr_name, horizon, stats_path, mode = sys.argv[1:7]
    build(tiny, out, repr_name, int(horizon), stats_path, mode)
