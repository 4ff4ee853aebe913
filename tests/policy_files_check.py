"""One checkpoint owner, proven by a round trip (issue 21 item 2): every kind of checkpoint gives its reader the
same representation, H, statistics, prompt and token map as the run it came from. Called by the tests that make
each kind: a full fine-tune and its checkpoint-N (test_golden, test_deepspeed: ZeRO-2/3), LoRA unmerged,
checkpoint-N and merged (test_lora), and the transformers export (test_export_hf)."""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from llava_vla_plugin.core import checkpoint

# tokens whose ids the prompt and decoding depend on, beside the action tokens
FRAME_TOKENS = ("<|im_start|>", "<|im_end|>")


def policy_view(path: Path) -> dict:
    """What a reader of `path` gets, through the checkpoint owner and the directory's own tokenizer."""
    ck = checkpoint.read(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    tokens = [*ck.action_tokenizer.tokens, *FRAME_TOKENS]
    return {"representation": ck.repr_config, "action_tokenizer": ck.action_tokenizer.to_dict(),
            "statistics": ck.statistics, "token_map": dict(zip(tokens, tok.convert_tokens_to_ids(tokens)))}


def assert_same_policy(reference: Path, other: Path) -> None:
    a, b = policy_view(Path(reference)), policy_view(Path(other))
    differs = [k for k in a if a[k] != b[k]]
    assert not differs, {k: (a[k], b[k]) for k in differs}
