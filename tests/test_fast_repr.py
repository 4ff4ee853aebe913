"""The `fast` action representation (core/representations/fast.py) on real code paths: targets on the real Qwen
tokenizer, the checkpoint files, the generation plan, invalid sequences through the policy path, metrics, and
the preflight refusal. The trained quality run and the checkpoint read by VLAPolicy: tests/test_action_chunks.py.
"""
from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, subprocess_env
from data_tools.converted_format import IGNORE_INDEX
from llava_vla_plugin.core.action_tokenizer import ActionTokenizer
from llava_vla_plugin.core.fast_codec import FILE_NAME, FastCodec, round_trip_bound
from llava_vla_plugin.core.representations import ActionReprConfig, ActionReprError, make_representation

H, D = 4, 7


def _windows(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, H)[:, None]
    return [np.clip(rng.uniform(-0.8, 0.8, D) + rng.uniform(-0.3, 0.3, D) * t, -1, 1) for _ in range(n)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fast_tok")
    FastCodec.fit(_windows(300, 0), vocab_size=256).save(d)
    return d


def _config(tok_dir, **kw) -> ActionReprConfig:
    return ActionReprConfig(name="fast", horizon=H, options={"tokenizer": str(tok_dir)}, **kw)


def test_targets_are_fast_tokens_and_round_trip(qwen_tokenizer, tok_dir):
    from llava_vla_plugin.core.prompt import VLAPromptBuilder

    tok = copy.deepcopy(qwen_tokenizer)
    at = ActionTokenizer()
    rep = make_representation(_config(tok_dir), at)
    n_before = len(tok)
    rep.bind(tok)
    n = rep.codec.n_tokens
    first = tok.convert_tokens_to_ids("<FAST_0>")
    assert first == at.token_ids[-1] + 1 and len(tok) == n_before + 256 + n  # after the bins, all new ids
    assert tok.convert_tokens_to_ids(f"<FAST_{n - 1}>") == first + n - 1
    assert first >= n_before  # never one of Qwen's own ids
    rep.bind(tok)  # idempotent
    assert len(tok) == n_before + 256 + n
    pb = VLAPromptBuilder(tok, at)
    bound = round_trip_bound(H, rep.codec.config.scale).max_abs
    for window in _windows(5, 1):
        ids, labels, extra = rep.build(pb, "open the drawer", window)
        n_prompt = len(pb.prompt_ids("open the drawer"))
        answer = ids[n_prompt:-len(pb.answer_suffix)]
        assert extra == {} and len(answer) <= rep.answer_tokens - 1
        assert ((answer >= first) & (answer < first + n)).all()
        assert ids[-len(pb.answer_suffix):].tolist() == pb.answer_suffix
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        assert labels[n_prompt:n_prompt + len(answer) + 1].tolist() == [*answer.tolist(), pb.im_end]
        assert (labels[n_prompt + len(answer) + 1:] == IGNORE_INDEX).all()
        result = rep.decode_ids([*answer, pb.im_end, pb.im_end], pb.im_end)  # cut at the first end
        assert result.ok and np.abs(result.actions - window).max() <= bound + 1e-6
    # the text round trip: the FAST tokens survive decode -> encode as single tokens (added special tokens)
    assert tok.encode(tok.decode(answer.tolist()), add_special_tokens=False) == answer.tolist()
    assert rep.clipped_windows == 0
    rep.build(pb, "open the drawer", np.ones((H, D)))  # far outside the fitted range: clipped, counted
    assert rep.clipped_windows == 1 and rep.clipped_coefficients > 0


def test_options_checkpoint_file_and_errors(tmp_path, tok_dir):
    from llava_vla_plugin.core import checkpoint

    cfg = _config(tok_dir)
    with pytest.raises(ActionReprError, match="vla-fit-fast --data_path"):
        make_representation(ActionReprConfig(name="fast", horizon=H))
    with pytest.raises(ActionReprError, match="fitted for H=4, D=7.*H=8"):
        make_representation(ActionReprConfig(name="fast", horizon=8, options={"tokenizer": str(tok_dir)}))
    with pytest.raises(ActionReprError, match="takes no --vla_repr_options"):
        from llava_vla_plugin.core.representations import representation_class
        representation_class("bins").check_options(ActionReprConfig(options={"tokenizer": "x"}))
    at = ActionTokenizer(first_token_id=151646)
    rep = make_representation(cfg, at)
    src, dst = tmp_path / "run", tmp_path / "merged"
    dst.mkdir()
    checkpoint.write(src, at, {"d": {"action": {"q01": [0.0] * D, "q99": [1.0] * D}}}, action_repr=rep)
    for d in (src, dst):
        (d / "config.json").write_text("{}")
    assert FILE_NAME in checkpoint.copy_policy_files(src, dst)  # a merge / export carries the codec
    assert (dst / FILE_NAME).read_bytes() == (tok_dir / FILE_NAME).read_bytes()
    read = checkpoint.read(dst)
    assert read.repr_config == cfg  # options saved in vla_action_repr.json
    # reading the checkpoint prefers its own codec, even where the training path is gone
    moved = ActionReprConfig(name="fast", horizon=H, options={"tokenizer": str(tmp_path / "gone")})
    again = make_representation(moved, at, directory=dst)
    assert again.codec.to_json() == rep.codec.to_json()


class _FakeTokenizer:
    def __init__(self, first: int, n: int):
        self.map = {f"<FAST_{i}>": first + i for i in range(n)}
        self.unk_token_id = None

    def convert_tokens_to_ids(self, tokens):
        return [self.map.get(t) for t in tokens]


class _FakePolicy:
    """What FastRepresentation.predict_normalized reads from VLAPolicy: generate_ids, end_id, tokenizer."""

    def __init__(self, rows, tokenizer, end_id):
        self.rows, self.tokenizer, self.end_id, self.decode_failures = rows, tokenizer, end_id, 0

    def generate_ids(self, inputs):
        return torch.tensor(self.rows)


def test_invalid_sequences_do_not_raise_and_are_counted(tok_dir, caplog):
    from llava_vla_plugin.infer.pipeline import ActionConstraint

    rep = make_representation(_config(tok_dir))
    first, end, n = 1000, 7, rep.codec.n_tokens
    tok = _FakeTokenizer(first, n)
    plan = rep.token_plan(tok)
    assert (plan.first_id, plan.n_ids, plan.exact) == (first, n, False) and plan.max_tokens >= H * D
    window = _windows(1, 5)[0]
    good = [first + t for t in rep.codec.encode(window)]
    width = len(good) + 3
    rows = [good + [end] * 3,                       # valid
            [first] + [end] * (width - 1),          # too few coefficients
            [3] * width]                            # not FAST ids at all
    policy = _FakePolicy(rows, tok, end)
    out = rep.predict_normalized(policy, None)
    assert out.shape == (3, H, D) and policy.decode_failures == 2
    assert np.abs(out[0] - window).max() <= round_trip_bound(H, 10.0).max_abs + 1e-6
    assert (out[1:] == 0).all()  # the reference's answer to an invalid sequence
    assert rep.clipped_predictions == 0

    assert "invalid FAST sequence" in caplog.text
    # the plan as a constraint: step 0 FAST only, then FAST or end, after max_tokens only the end
    proc = ActionConstraint(first, n, end, 3, exact=False)
    scores = torch.zeros(1, first + n + 5)
    allowed = [torch.isfinite(proc(torch.zeros(1, 10 + s, dtype=torch.long), scores))[0] for s in range(4)]
    assert not allowed[0][end] and allowed[0][first:first + n].all() and allowed[0].sum() == n
    assert allowed[1][end] and allowed[2][first:first + n].all() and allowed[2].sum() == n + 1
    assert allowed[3].sum() == 1 and allowed[3][end]


def test_decoded_values_past_the_normalized_range_are_clipped_and_counted(tmp_path):
    """Rounding the DCT coefficients can decode a window near 1 to a little more than 1: clipped to the range
    the statistics un-normalize, counted and logged, never silent."""
    rng = np.random.default_rng(0)
    FastCodec.fit([rng.uniform(-1, 1, (H, D)) for _ in range(300)], vocab_size=300).save(tmp_path)
    rep = make_representation(_config(tmp_path))
    first, end = 1000, 7
    for _ in range(3000):  # a seeded search for a window whose round trip leaves [-1, 1]
        window = rng.uniform(0.85, 1.0, (H, D))
        over = int((np.abs(rep.codec.decode(rep.codec.encode(window), H, D).actions) > 1).sum())
        if over:
            break
    assert over, "no window near 1 decodes past 1 with this codec: the test needs another seed"
    policy = _FakePolicy([[first + t for t in rep.codec.encode(window)] + [end]], _FakeTokenizer(first, rep.codec.n_tokens), end)
    out = rep.predict_normalized(policy, None)
    assert out.max() == 1.0 and rep.clipped_predictions == over and policy.decode_failures == 0


def test_metrics_spans_and_l1(tok_dir):
    rep = make_representation(_config(tok_dir))
    rep.first_fast_id = first = 100
    n, end = rep.codec.n_tokens, 5
    spans = [rep.codec.encode(w) for w in _windows(2, 9)]
    targets = torch.tensor([t + first for t in spans[0]] + [end] + [t + first for t in spans[1]] + [end])
    logits = torch.full((len(targets), first + n + 1), -10.0)
    logits[torch.arange(len(targets)), targets] = 10.0  # perfect predictions
    m = rep.metrics()
    m.update_output(type("Out", (), {"targets": targets, "logits": logits})())
    s = m.summary()
    assert s["action_accuracy_teacher_forced"] == 1.0 and s["action_l1"] == 0.0 and m.total == len(targets) - 2
    logits[0] = -10.0
    logits[0, end] = 10.0  # a non-FAST token wins position 0; its best FAST row is still 0 -> index 0
    logits[0, first + (spans[0][0] + 1) % n] = 5.0
    m.reset()
    m.update_output(type("Out", (), {"targets": targets, "logits": logits})())
    s = m.summary()
    assert s["action_accuracy_teacher_forced"] == (m.total - 1) / m.total
    assert s["action_accuracy_teacher_forced_constrained"] == (m.total - 1) / m.total and s["action_l1"] > 0


def test_preflight_refuses_fast_without_tokenizer(tmp_path, tok_dir):
    data = tmp_path / "train.jsonl"
    data.write_text("")
    base = [sys.executable, "-m", "llava_vla_plugin.train.preflight", "--data_path", str(data),
            "--vla_action_repr", "fast", "--vla_horizon", str(H)]
    proc = subprocess.run(base, capture_output=True, text=True, cwd=ROOT, timeout=120, env=subprocess_env())
    assert proc.returncode == 2, proc.stderr
    assert "--vla_repr_options tokenizer=DIR" in proc.stderr and "vla-fit-fast --data_path" in proc.stderr
    ok = subprocess.run(base + ["--vla_repr_options", f"tokenizer={tok_dir}"], capture_output=True, text=True,
                        cwd=ROOT, timeout=120, env=subprocess_env())
    assert ok.returncode == 0, ok.stderr
