import copy

import numpy as np
import pytest

from conftest import requires_upstream
from llava_vla_plugin.core.action_tokenizer import ActionTokenizer
from llava_vla_plugin.core.prompt import IGNORE_INDEX, IMAGE_TOKEN_INDEX, VLAPromptBuilder


@pytest.fixture(scope="module")
def builder(qwen_tokenizer):
    tok = copy.deepcopy(qwen_tokenizer)
    at = ActionTokenizer()
    at.add_to_tokenizer(tok)
    return VLAPromptBuilder(tok, at)


def test_labels_cover_only_actions_and_im_end(builder):
    action = [0.1, -0.5, 1.0, -1.0, 0.0, 0.3, 1.0]
    ids, labels = builder.build("Put the Cup in the sink", action)
    kept = labels[labels != IGNORE_INDEX]
    at = builder.action_tokenizer
    assert kept.tolist() == [*at.encode_to_ids(action).tolist(), 151645]
    assert (ids == IMAGE_TOKEN_INDEX).sum() == 1
    text = builder.tokenizer.decode([i for i in ids if i >= 0])
    assert "What action should the robot take to put the cup in the sink?" in text  # lowercased
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    # the prompt used at inference is exactly the training prefix
    assert builder.prompt_ids("Put the Cup in the sink") == ids[: len(ids) - 9].tolist()


def test_piecewise_tokenization_equals_whole_string(builder):
    tok = copy.deepcopy(builder.tokenizer)
    tok.add_tokens(["<image>"], special_tokens=True)
    image_id = tok.convert_tokens_to_ids("<image>")
    for instr in ["open the drawer", "pick up the 3 red blocks!", "  move\tleft ", "Ünïcode çup", ""]:
        ids, _ = builder.build(instr, [0.0] * 7)
        prompt = builder.prompt_text(instr)
        whole = tok(prompt, add_special_tokens=False)["input_ids"]
        whole = [IMAGE_TOKEN_INDEX if i == image_id else i for i in whole]
        assert ids[: len(whole)].tolist() == whole, instr


@requires_upstream
def test_input_ids_match_upstream_preprocess_qwen(builder):
    from llava.train.train import preprocess_qwen

    at = builder.action_tokenizer
    rng = np.random.default_rng(0)
    for instr in ["put the cup in the sink", "Stack The Blocks", "wipe the table with the sponge"]:
        action = rng.uniform(-1, 1, 7)
        ids, _ = builder.build(instr, action)
        tokens = "".join(at.tokens[b] for b in at.encode(action))
        src = [[{"from": "human", "value": f"<image>\nWhat action should the robot take to {instr.lower()}?"},
                {"from": "gpt", "value": tokens}]]
        up = preprocess_qwen(src, builder.tokenizer, has_image=True)
        np.testing.assert_array_equal(up["input_ids"][0].numpy(), ids)
