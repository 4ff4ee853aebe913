"""Prompt and labels for VLA samples (docs/DESIGN.md 2.4), with the tokenizer prepared once.

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<image>\\nWhat action should the robot take to {instruction}?<|im_end|>\\n
    <|im_start|>assistant\\n<ACTION_a>...<ACTION_g><|im_end|>\\n

Special tokens split the text, so tokenizing the pieces between them separately gives exactly the
ids of tokenizing the whole string (tests check this against upstream's preprocess_qwen). Only the
instruction piece varies; it is cached, since every frame of an episode shares it.
Labels: the action tokens and the closing <|im_end|>; everything else IGNORE_INDEX.

A run with more camera views (core/inputs.py) has one `<image>\n` per view before the instruction; a run with
the state appends its text, "\nState: 12 200 ...;", to the instruction (`with_state`; core/inputs.state_text).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from data_tools.converted_format import IGNORE_INDEX, IMAGE_TOKEN as DEFAULT_IMAGE_TOKEN
from data_tools.converted_format import prompt_text as instruction_text
from llava_vla_plugin.core.action_tokenizer import ActionTokenizer

IMAGE_TOKEN_INDEX = -200  # upstream's placeholder id, replaced by visual features in the model
__all__ = ["IGNORE_INDEX", "IMAGE_TOKEN_INDEX", "DEFAULT_IMAGE_TOKEN", "instruction_text", "VLAPromptBuilder"]


class VLAPromptBuilder:
    def __init__(self, tokenizer, action_tokenizer: ActionTokenizer, cache_size: int = 65536, n_views: int = 1):
        self.tokenizer = tokenizer
        self.action_tokenizer = action_tokenizer
        if n_views < 1:
            raise ValueError(f"a VLA prompt has at least one image, got n_views={n_views}")
        self.n_views = n_views
        enc = self._encode
        im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
        if im_start is None or im_end is None or im_start == tokenizer.unk_token_id:
            raise ValueError("the tokenizer has no <|im_start|>/<|im_end|>: VLA prompts need a Qwen2 chat tokenizer")
        self.im_end = im_end
        nl = enc("\n")
        system = action_tokenizer.system_message
        images = [IMAGE_TOKEN_INDEX]
        for _ in range(n_views - 1):  # "<image>\n<image>\n{prompt}": upstream's ids for a multi-image turn
            images += [*nl, IMAGE_TOKEN_INDEX]
        self.prefix = [im_start, *enc("system\n" + system), im_end, *nl, im_start, *enc("user\n"), *images]
        self.state = ""  # with_state: this sample's state text (core/inputs.state_text)
        self.user_suffix = [im_end, *nl, im_start, *enc("assistant\n")]
        self.answer_suffix = [im_end, *nl]
        self._instruction_ids = lru_cache(maxsize=cache_size)(self._instruction_ids_uncached)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _instruction_ids_uncached(self, instruction: str) -> tuple[int, ...]:
        return tuple(self._encode("\n" + instruction_text(instruction, self.action_tokenizer.prompt)))

    def with_state(self, state: str) -> "VLAPromptBuilder":
        """This builder for one sample whose state text is `state` (core/inputs.state_text): the same object
        everywhere a representation takes a prompt builder, so no representation knows about the state."""
        import copy

        bound = copy.copy(self)
        bound.state = state
        return bound

    def prompt_ids(self, instruction: str) -> list[int]:
        """Everything up to and including `<|im_start|>assistant\\n`: what inference feeds the model."""
        if not self.state:
            return [*self.prefix, *self._instruction_ids(instruction), *self.user_suffix]
        # instruction and state are one piece of text between special tokens, tokenized at once ("?\n" is one
        # token); not cached: the state differs in every frame
        text = "\n" + instruction_text(instruction, self.action_tokenizer.prompt) + self.state
        return [*self.prefix, *self._encode(text), *self.user_suffix]

    def build(self, instruction: str, action) -> tuple[np.ndarray, np.ndarray]:
        """input_ids and labels (int64) for one sample; `action` is the normalized 7-d action."""
        prompt = self.prompt_ids(instruction)
        action_ids = self.action_tokenizer.encode_to_ids(action).tolist()
        input_ids = np.array([*prompt, *action_ids, *self.answer_suffix], dtype=np.int64)
        labels = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int64)
        start = len(prompt)
        labels[start:start + len(action_ids) + 1] = input_ids[start:start + len(action_ids) + 1]
        return input_ids, labels

    def prompt_text(self, instruction: str) -> str:
        """The prompt as text (for logs and for clients that tokenize themselves)."""
        system = self.action_tokenizer.system_message
        return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
                + f"{DEFAULT_IMAGE_TOKEN}\n" * self.n_views
                + f"{instruction_text(instruction, self.action_tokenizer.prompt)}{self.state}<|im_end|>\n<|im_start|>assistant\n")
