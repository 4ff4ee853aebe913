"""The FAST action tokenizer (llava_vla_plugin/core/fast_codec.py) against the reference's own numbers.

Reference numbers: physical-intelligence/fast's `processing_action_tokenizer.py` (Hugging Face hub; the
6,145-byte file, sha256 6f021ca1...c20, line numbers as cited in fast_codec.py), run unchanged in a
throwaway folder outside this repository with this project's .venv (transformers 4.57.6, tokenizers 0.22.2,
scipy 1.17.1, numpy 2.4.6):

    UniversalActionProcessor.fit(list(smooth_windows(200, 8, 7, seed=0)), scale=10, vocab_size=1024,
                                 time_horizon=8, action_dim=7)
    proc(smooth_windows(3, 8, 7, seed=1)); proc.decode(...); proc.decode([invalid]) ...

(`smooth_windows` is the function below, copied into that script.) The printed values are pasted here.
The reference's BPE fit is byte-reproducible: its `backend_tokenizer.to_str()` sha256 is pinned and ours
must equal it, so token ids are compared directly.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from llava_vla_plugin.core.fast_codec import (FILE_NAME, FastCodec, FastCodecError, dct_matrix, dct_ortho, idct_ortho,
                                               quantize, round_trip_bound)

H, D = 8, 7


def smooth_windows(n: int, horizon: int, dim: int, seed: int) -> np.ndarray:
    """Seeded smooth chunks in [-1, 1]: a random start plus a cumulative sum of small steps, clipped."""
    rng = np.random.default_rng(seed)
    start = rng.uniform(-0.6, 0.6, size=(n, 1, dim))
    steps = rng.normal(0.0, 0.05, size=(n, horizon, dim))
    return np.clip(start + np.cumsum(steps, axis=1), -1.0, 1.0)


# ---- reference output (see the module docstring for the command) -----------------------------------------
REF_MIN_TOKEN, REF_MAX_TOKEN = -22, 22
REF_VOCAB_LEN = 473           # inner.get_vocab_size(); 395 merges
REF_TOKENIZER_SHA256 = "792379ff7c023188d9679a47ed21c8b38e27abe627870fe481c0f65d595ce85b"
REF_COEFF = [  # np.around(dct(w, axis=0, norm="ortho") * 10).flatten(), processing_action_tokenizer.py:52-56
    [2, 16, -11, 11, -9, -2, 10, -1, 1, 2, 0, 0, 0, 1, 0, 0, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
     0, 0, 0, 0, 0, 0, -1, 0, 0, 0, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [-5, 3, -20, 12, -1, -6, 9, 0, -1, 3, -1, 1, -2, 0, 0, 1, 0, -1, 1, 1, -1, 0, -1, 0, 1, 0, -1, 0, -1, 0, 0, 0, 0,
     0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [-8, 2, -16, -2, -13, -8, 6, 1, -1, 1, -1, 1, -1, 1, 0, 0, 0, 0, 1, 1, -1, 0, -1, 0, 0, 0, 1, 0, 0, 1, 0, 0, -1,
     0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -1, 0, 0, 0, 0, 0, 0, 0],
]
REF_TOKENS = [  # proc(probe), processing_action_tokenizer.py:43-58
    [69, 38, 56, 33, 58, 65, 77, 91, 69, 90, 152, 109, 153, 96],
    [62, 70, 47, 34, 66, 61, 76, 81, 70, 91, 65, 87, 81, 143, 113, 135, 83, 128, 67],
    [59, 69, 51, 65, 54, 59, 249, 91, 91, 91, 79, 143, 81, 90, 87, 130, 109, 108],
]
REF_DECODED_0 = [  # proc.decode(tokens)[0], processing_action_tokenizer.py:60-96
    [0.02167141409849324, 0.6147246889693997, -0.35615834985609696, 0.3889087296526012, -0.3181980515339464,
     -0.09848918976963487, 0.4025926546134353],
    [0.0291371975035275, 0.6072589055643655, -0.27870196341503684, 0.3889087296526012, -0.3181980515339464,
     -0.021671414098493245, 0.395126871208401],
    [0.04293216646767466, 0.5934639366002182, -0.3604115113579508, 0.3889087296526012, -0.3181980515339464,
     -0.08046519421946119, 0.3813319022442539],
    [0.060956162017848356, 0.5754399410500446, -0.30407154920716956, 0.3889087296526012, -0.3181980515339464,
     -0.11228415873378203, 0.3633079066940802],
    [0.08046519421946118, 0.5559309088484317, -0.3430896136103952, 0.3889087296526012, -0.3181980515339464,
     -0.0291371975035275, 0.3437988744924674],
    [0.09848918976963487, 0.537906913298258, -0.4715255579618713, 0.3889087296526012, -0.3181980515339464,
     -0.06095616201784834, 0.3257748789422937],
    [0.11228415873378202, 0.5241119443341108, -0.4449958858755459, 0.3889087296526012, -0.3181980515339464,
     -0.11974994213881629, 0.31197990997814656],
    [0.11974994213881629, 0.5166461609290766, -0.5523154059367431, 0.3889087296526012, -0.3181980515339464,
     -0.04293216646767466, 0.3045141265731123],
]
REF_MAX_ERR = [0.05591946591311103, 0.06658808752622036, 0.08008246811059033]  # |decoded - probe|.max()
REF_TRAIN_COUNTS = (13.3, 9, 18, 2660)  # tokens per training window: mean, min, max, total
# -1 everywhere: the DC coefficient -28 is clamped to min_token -22 (np.maximum, :56) -> these tokens, and
# every decoded value is -22 / 10 / sqrt(8)
REF_MINUS_ONES_TOKENS = [45, 45, 45, 45, 45, 45, 45, 83, 83, 180]
REF_MINUS_ONES_VALUE = -0.7778174593052024
# +1 everywhere: DC +28 > max_token 22 is not clamped by the reference; the character is outside the alphabet
# and BPE drops it: 3 tokens that decode to 49 coefficients, i.e. to zeros (:84-94)
REF_ONES_TOKENS = [83, 83, 180]


@pytest.fixture(scope="module")
def train() -> np.ndarray:
    return smooth_windows(200, H, D, seed=0)


@pytest.fixture(scope="module")
def probe() -> np.ndarray:
    return smooth_windows(3, H, D, seed=1)


@pytest.fixture(scope="module")
def codec(train) -> FastCodec:
    return FastCodec.fit(list(train), vocab_size=1024, scale=10.0)


# ---- the DCT ---------------------------------------------------------------------------------------------
def test_dct_is_the_orthonormal_dct_ii():
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, size=(H, D))
    # the closed form, summed term by term (independent of dct_matrix's vectorized construction)
    expected = np.zeros((H, D))
    for k in range(H):
        s = np.sqrt(1.0 / H) if k == 0 else np.sqrt(2.0 / H)
        for n in range(H):
            expected[k] += s * np.cos(np.pi * (2 * n + 1) * k / (2 * H)) * x[n]
    np.testing.assert_allclose(dct_ortho(x), expected, atol=1e-12)
    np.testing.assert_allclose(idct_ortho(dct_ortho(x)), x, atol=1e-12)
    np.testing.assert_allclose(dct_matrix(H) @ dct_matrix(H).T, np.eye(H), atol=1e-12)


def test_dct_and_quantization_equal_scipys():
    fft = pytest.importorskip("scipy.fft", reason="scipy is not installed: the closed-form test above covers the DCT")
    rng = np.random.default_rng(6)
    for horizon in (1, 4, 8, 10, 50):
        x = rng.uniform(-1, 1, size=(horizon, D))
        np.testing.assert_allclose(dct_ortho(x), fft.dct(x, axis=0, norm="ortho"), atol=1e-12)
        np.testing.assert_allclose(idct_ortho(x), fft.idct(x, axis=0, norm="ortho"), atol=1e-12)
    windows = smooth_windows(500, H, D, seed=7)
    ours = np.stack([quantize(w, 10.0) for w in windows])
    theirs = np.around(fft.dct(windows, axis=1, norm="ortho") * 10).astype(np.int64)
    assert np.array_equal(ours, theirs)


# ---- the reference's numbers -----------------------------------------------------------------------------
def test_fit_reproduces_the_reference_vocabulary(codec):
    c = codec.config
    assert (c.min_token, c.max_token, c.n_tokens, c.horizon, c.action_dim) == (REF_MIN_TOKEN, REF_MAX_TOKEN,
                                                                               REF_VOCAB_LEN, H, D)
    assert c.alphabet_size == REF_MAX_TOKEN - REF_MIN_TOKEN + 1
    # the whole BPE (vocabulary, merges, pre-tokenizer, decoder) serializes to the reference's bytes
    assert hashlib.sha256(codec.bpe_json.encode()).hexdigest() == REF_TOKENIZER_SHA256


def test_coefficients_tokens_and_decode_equal_the_references(codec, probe):
    for i, w in enumerate(probe):
        assert codec.coefficients(w).reshape(-1).tolist() == REF_COEFF[i]
        assert codec.encode(w) == REF_TOKENS[i]
        result = codec.decode(REF_TOKENS[i])
        assert result.ok and result.reason == ""
        assert result.actions.dtype == np.float32 and result.actions.shape == (H, D)
        assert float(np.abs(result.actions - w).max()) == pytest.approx(REF_MAX_ERR[i], abs=1e-6)
    np.testing.assert_allclose(codec.decode(REF_TOKENS[0]).actions, np.asarray(REF_DECODED_0), atol=1e-6)


def test_token_counts_on_the_fit_windows_equal_the_references(codec, train):
    counts = [len(codec.encode(w)) for w in train]
    assert (np.mean(counts), min(counts), max(counts), sum(counts)) == pytest.approx(REF_TRAIN_COUNTS)
    assert max(counts) < H * D  # compression: the bins representation needs H x D = 56 tokens for each


def test_minus_ones_is_clamped_below_as_the_reference(codec):
    w = -np.ones((H, D))
    assert codec.encode(w) == REF_MINUS_ONES_TOKENS
    assert codec.encode_report(w).clipped == D  # the DC term of each dimension
    result = codec.decode(REF_MINUS_ONES_TOKENS)
    assert result.ok
    np.testing.assert_allclose(result.actions, REF_MINUS_ONES_VALUE, atol=1e-6)


def test_plus_ones_is_clipped_above_where_the_reference_emits_an_undecodable_sequence(codec):
    # The reference: REF_ONES_TOKENS decode to 49 of 56 coefficients -> zeros. Ours, on those very tokens:
    bad = codec.decode(REF_ONES_TOKENS)
    assert not bad.ok and "49 coefficients" in bad.reason and not bad.actions.any()
    # ...and our encode clips the DC term to max_token instead, so the sequence decodes.
    report = codec.encode_report(np.ones((H, D)))
    assert report.clipped == D and report.tokens != REF_ONES_TOKENS
    result = codec.decode(report.tokens)
    assert result.ok
    np.testing.assert_allclose(result.actions, REF_MAX_TOKEN / 10 / np.sqrt(H), atol=1e-6)


# ---- invalid sequences: a defined result, never an exception -----------------------------------------------
@pytest.mark.parametrize("name, tokens, reason", [
    # the reference's own failures (all zeros there too: processing_action_tokenizer.py:91-95)
    ("truncated", REF_TOKENS[0][:-1], "53 coefficients"),
    ("empty", [], "0 coefficients"),
    ("unknown id after truncation", REF_TOKENS[0][:-1] + [5000], "outside the vocabulary"),
    ("doubled", REF_TOKENS[0] + REF_TOKENS[0], "112 coefficients"),
    # stricter than the reference, which decodes `valid + [5000]` as `valid` (its BPE skips the id)
    ("valid plus unknown id", REF_TOKENS[0] + [5000], "outside the vocabulary"),
    ("negative id", [-1] + REF_TOKENS[0][1:], "outside the vocabulary"),
    ("not integers", ["a", "b"], "not integers"),
    ("nan", [float("nan")], "not integers"),
    ("fractional", [3.7] + REF_TOKENS[0][1:], "not integers"),
    ("numeric strings", [str(t) for t in REF_TOKENS[0]], "not integers"),
])
def test_invalid_sequences_decode_to_zeros_with_a_reason(codec, name, tokens, reason):
    result = codec.decode(tokens)
    assert not result.ok, name
    assert reason in result.reason, result.reason
    assert result.actions.shape == (H, D) and result.actions.dtype == np.float32
    assert not result.actions.any()


def test_a_character_outside_the_alphabet_is_invalid(train):
    # At scale 100 the alphabet (451 levels) needs two UTF-8 bytes per character above 127; the token of a lone
    # lead byte (0xC2, byte-level character "\u00c2") decodes to U+FFFD, which the reference would turn into
    # the coefficient 65533 + min_token. The count (56) is right, the characters are not:
    codec = FastCodec.fit(list(train), scale=100.0)
    lead = json.loads(codec.bpe_json)["model"]["vocab"]["\u00c2"]
    result = codec.decode([lead] * (H * D))
    assert not result.ok and "U+FFFD is outside the alphabet" in result.reason and not result.actions.any()


def test_decode_with_another_shape_follows_the_count_rule(codec, probe):
    tokens = codec.encode(probe[0])
    assert codec.decode(tokens, horizon=4, action_dim=14).ok  # 56 coefficients fit [4, 14] too (as the reference)
    result = codec.decode(tokens, horizon=7, action_dim=7)
    assert not result.ok and result.actions.shape == (7, 7)


# ---- the quantization bound --------------------------------------------------------------------------------
def test_bound_values():
    b = round_trip_bound(8, 10.0)
    assert b.l2_per_dim == pytest.approx(np.sqrt(8) * 0.05)
    assert b.max_abs <= b.l2_per_dim  # Cauchy-Schwarz: each DCT column has unit norm
    assert round_trip_bound(8, 20.0).max_abs == pytest.approx(b.max_abs / 2)


def test_round_trips_stay_within_the_bound_and_the_bound_is_tight():
    rng = np.random.default_rng(11)
    windows = np.concatenate([smooth_windows(300, H, D, seed=12), rng.uniform(-0.3, 0.3, size=(100, H, D))])
    codec = FastCodec.fit(list(windows), vocab_size=1024, scale=10.0)
    bound = round_trip_bound(H, 10.0)
    worst_abs = worst_l2 = 0.0
    for w in windows:
        report = codec.encode_report(w)
        assert report.clipped == 0  # fitted on these windows: every coefficient is inside the alphabet
        result = codec.decode(report.tokens)
        assert result.ok
        err = result.actions.astype(np.float64) - w
        worst_abs = max(worst_abs, float(np.abs(err).max()))
        worst_l2 = max(worst_l2, float(np.linalg.norm(err, axis=0).max()))
    assert worst_abs <= bound.max_abs + 1e-6  # float32 output
    assert worst_l2 <= bound.l2_per_dim + 1e-6
    # tight: rounding errors just under 0.5/scale with the signs of the DCT column that has the largest
    # absolute sum reach the max-abs bound at that step
    c = dct_matrix(H)
    n_star = int(np.abs(c).sum(axis=0).argmax())
    r = 0.499 * np.sign(c[:, n_star])
    coeff = np.zeros((H, D))
    coeff[:, 0] = r
    w = idct_ortho(coeff / 10.0)
    result = codec.decode(codec.encode(w))
    assert result.ok
    assert abs(float(result.actions[n_star, 0]) - w[n_star, 0]) == pytest.approx(bound.max_abs * 0.998, rel=1e-4)


# ---- determinism, persistence, LM tokens -----------------------------------------------------------------
def test_fit_is_deterministic_and_the_file_byte_identical(tmp_path, train):
    a = FastCodec.fit(list(train)).save(tmp_path / "a")
    b = FastCodec.fit(list(train)).save(tmp_path / "b")
    assert a.name == FILE_NAME and a.read_bytes() == b.read_bytes()
    assert not list((tmp_path / "a").glob(".*.tmp"))  # written through data_tools.atomic
    s1 = FastCodec.fit(list(train), max_windows=50, seed=1).save(tmp_path / "s1").read_bytes()
    s1_again = FastCodec.fit(list(train), max_windows=50, seed=1).save(tmp_path / "s1b").read_bytes()
    s2 = FastCodec.fit(list(train), max_windows=50, seed=2).save(tmp_path / "s2").read_bytes()
    assert s1 == s1_again and s1 != s2  # the seed picks the subset, and only that


def test_save_load_round_trip(tmp_path, codec, probe):
    path = codec.save(tmp_path)
    d = json.loads(path.read_text())
    assert d["format"] == "vla_fast_tokenizer" and d["version"] == 1
    assert {k: d[k] for k in ("horizon", "action_dim", "scale", "vocab_size", "n_tokens", "min_token", "max_token",
                              "alphabet_size")} == {"horizon": H, "action_dim": D, "scale": 10.0, "vocab_size": 1024,
                                                    "n_tokens": REF_VOCAB_LEN, "min_token": REF_MIN_TOKEN,
                                                    "max_token": REF_MAX_TOKEN, "alphabet_size": 45}
    for loaded in (FastCodec.load(tmp_path), FastCodec.load(path), FastCodec.from_dict(codec.to_dict())):
        assert loaded.config == codec.config and loaded.to_json() == codec.to_json()
        assert hashlib.sha256(loaded.bpe_json.encode()).hexdigest() == REF_TOKENIZER_SHA256
        assert [loaded.encode(w) for w in probe] == REF_TOKENS


def test_load_errors_name_the_file(tmp_path, codec):
    with pytest.raises(FastCodecError, match=f"{tmp_path / FILE_NAME} not found.*fit_fast"):
        FastCodec.load(tmp_path)
    path = codec.save(tmp_path)
    d = json.loads(path.read_text())
    for broken, match in ((dict(d, version=2), "format version 2"), (dict(d, format="x"), "not a vla_fast_tokenizer"),
                          ({k: v for k, v in d.items() if k != "min_token"}, "lacks min_token"),
                          (dict(d, n_tokens=5), "5")):
        path.write_text(json.dumps(broken))
        with pytest.raises(FastCodecError, match=match) as e:
            FastCodec.load(tmp_path)
        assert str(path) in str(e.value)
    path.write_text("{not json")
    with pytest.raises(FastCodecError, match=f"{path}: not valid JSON"):
        FastCodec.load(path)


def test_fit_refuses_bad_input(train):
    with pytest.raises(FastCodecError, match="no windows"):
        FastCodec.fit([])
    with pytest.raises(FastCodecError, match=r"window 1: shape \(4, 7\) differs"):
        FastCodec.fit([train[0], train[1][:4]])
    with pytest.raises(FastCodecError, match="window 1: non-finite"):
        FastCodec.fit([train[0], np.full((H, D), np.nan)])
    with pytest.raises(FastCodecError, match="window 0: values up to 3 are not normalized"):
        FastCodec.fit([np.full((H, D), 3.0)])
    with pytest.raises(FastCodecError, match="vocab_size 20 is too small.*increase vocab_size or lower scale"):
        FastCodec.fit(list(train), vocab_size=20)
    codec = FastCodec.fit(list(train[:20]))
    with pytest.raises(FastCodecError, match="differs from the codec"):
        codec.encode(np.zeros((4, D)))


def test_token_strings_are_dedicated_added_tokens(codec, probe):
    from llava_vla_plugin.apps.tiny_model import build_qwen2_tokenizer

    names = codec.token_strings()
    assert len(names) == codec.n_tokens == REF_VOCAB_LEN and names[0] == "<FAST_0>" and names[-1] == "<FAST_472>"
    tok = build_qwen2_tokenizer()  # a fresh one: the session fixture is shared and must stay unchanged
    base = len(tok)
    tok.add_tokens(names, special_tokens=True)
    ids = tok.convert_tokens_to_ids(names)
    assert ids == list(range(base, base + len(names)))  # new ids, after Qwen's own: never a Qwen text id
    fast_ids = codec.encode(probe[1])
    text = "".join(names[i] for i in fast_ids)
    lm_ids = tok(text, add_special_tokens=False)["input_ids"]
    assert [i - base for i in lm_ids] == fast_ids  # one LM token per FAST token, both ways
    assert codec.decode([i - base for i in lm_ids]).ok
