import numpy as np
import pytest

from llava_vla_plugin.core.action_tokenizer import ActionTokenizer


def test_every_bin_round_trips_to_its_centre():
    at = ActionTokenizer()
    centres = at.bin_centers
    assert len(centres) == 256
    np.testing.assert_array_equal(at.encode(centres), np.arange(256))
    np.testing.assert_allclose(at.decode(np.arange(256)), centres)
    # interval edges: the left edge belongs to its interval
    edges = -1 + np.arange(256) * (2 / 256)
    np.testing.assert_array_equal(at.encode(edges), np.arange(256))


def test_extremes_and_clipping():
    at = ActionTokenizer()
    assert at.encode(-1.0) == 0
    assert at.encode(1.0) == 255  # +1 maps to the last interval
    assert at.encode(np.nextafter(1.0, 0)) == 255
    np.testing.assert_array_equal(at.encode([-7.0, 3.5, 1e9]), [0, 255, 255])
    assert abs(at.decode(0) - (-1 + 1 / 256)) < 1e-12
    assert abs(at.decode(255) - (1 - 1 / 256)) < 1e-12


def test_decode_error_is_at_most_half_a_bin():
    at = ActionTokenizer()
    x = np.random.default_rng(0).uniform(-1, 1, size=(1000, 7))
    err = np.abs(at.decode(at.encode(x)) - x)
    assert err.max() <= 1 / 256 + 1e-12
    assert at.encode(x).shape == (1000, 7)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_refused(bad):
    with pytest.raises(ValueError, match="non-finite"):
        ActionTokenizer().encode([0.0, bad])


def test_token_ids_need_binding_and_out_of_range_ids_refused(qwen_tokenizer):
    at = ActionTokenizer()
    with pytest.raises(RuntimeError, match="add_to_tokenizer"):
        at.encode_to_ids([0.0])
    import copy

    t = copy.deepcopy(qwen_tokenizer)  # the session fixture stays without action tokens
    assert at.add_to_tokenizer(t) == 256
    assert at.add_to_tokenizer(t) == 0  # idempotent
    assert at.first_token_id == 151646 and at.token_ids[-1] == 151901
    assert len(t) == 151902  # fits under Qwen2-0.5B's 151936 embedding rows
    with pytest.raises(ValueError, match="not action tokens"):
        at.decode_ids([151645])


def test_action_strings_survive_decode_encode(qwen_tokenizer):
    """The reason for dedicated tokens: 7-token strings must re-tokenize to the same ids."""
    import copy

    t = copy.deepcopy(qwen_tokenizer)
    at = ActionTokenizer()
    at.add_to_tokenizer(t)
    rng = np.random.default_rng(1)
    for _ in range(200):
        ids = at.encode_to_ids(rng.uniform(-1, 1, 7)).tolist()
        text = t.decode(ids)
        assert t(text, add_special_tokens=False)["input_ids"] == ids


def test_save_load(tmp_path):
    at = ActionTokenizer(first_token_id=151646)
    at.save(tmp_path)
    back = ActionTokenizer.load(tmp_path)
    assert back == at
    d = back.to_dict()
    assert d["tokens"][0] == "<ACTION_0>" and d["token_ids"][255] == 151901
    with pytest.raises(FileNotFoundError, match="vla_action_tokenizer.json"):
        ActionTokenizer.load(tmp_path / "nothing")
