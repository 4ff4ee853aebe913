"""Re-Mix (issue 24 item 3): learned dataset weights from a proxy run against a reference run.

- The update and the proxy objective against a line-by-line transcription of the reference code (jhejna/remix
  7ff87a6 scripts/train_remix.py:171-213), over several batches, including the average the result is.
- Two ranks give the weights and the gradient of one process on the whole batch (the all-reduced sums, the
  world-size scaling).
- The mixture tool: a result file is read as the `remix` rule (shares = the learned weights), recorded in the file;
  the wrong rule with such a file, or the rule without one, is refused.
- End to end on CPU, through the launcher's argv: a reference run, then a proxy run with REMIX_REFERENCE. The task
  has a dataset whose action follows the image (learnable) and one whose actions are uniform noise. Re-Mix's rule
  moves weight to the domain where the proxy's loss exceeds the reference's most: the learnable one, which the
  reference has learned and the proxy has not yet. The noise domain's loss cannot be lowered by either model, so its
  excess stays near 0 and it ends BELOW its initial share (never below smoothing x its initial share, the floor
  the rule keeps); the learnable dataset ends above its initial share. The proxy writes its weights, its curve and
  figure, its state in each checkpoint, and a training mixture any run can use.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, UPSTREAM_REASON, subprocess_env, upstream_available
from data_tools import remix_weights as rw

remix = pytest.importorskip("llava_vla_plugin.train.remix", reason=UPSTREAM_REASON)


# ---- the reference code, transcribed (jax.numpy -> numpy; line numbers of train_remix.py at 7ff87a6) ---------------
def ref_per_domain(losses, domains, num_domains):  # :171-177
    one_hot = np.eye(num_domains)[domains].T  # jax.nn.one_hot(domains, num_domains, axis=0): (D, B)
    per_domain = one_hot @ losses
    norm = np.maximum(one_hot @ (losses != 0), 1.0)
    return per_domain / norm


def ref_step(alpha, average, step, initial, proxy, ref, domains, step_size=0.2, smoothing=0.05):  # :198-213
    D = len(alpha)
    excess = proxy - ref
    clipped = np.clip(excess, 0, None)
    per_domain = ref_per_domain(clipped, domains, D)
    alpha = alpha * np.exp(step_size * per_domain)
    alpha = alpha / alpha.sum()
    alpha = (1 - smoothing) * alpha + initial * smoothing
    loss = alpha @ ref_per_domain(excess, domains, D)  # _domain_weighted_loss on the unclipped excess
    average = average + (alpha - average) / (step + 1)
    return alpha, average, loss


def _batches(n_batches=6, batch=10, D=3, seed=0):
    g = np.random.default_rng(seed)
    for k in range(n_batches):
        domains = g.integers(0, D, batch)
        domains[:D] = np.arange(D) if k != 2 else domains[:D]  # batch 2 may lack a domain (its mean is then 0)
        if k == 2:
            domains[domains == 1] = 0
        proxy = g.uniform(0.5, 3.0, batch)
        ref = proxy + g.normal(0, 0.8, batch)  # excess of both signs: clipping and the nonzero counts matter
        ref[0] = proxy[0]  # one exact zero excess
        yield proxy, ref, domains


def test_update_and_objective_match_the_reference_code():
    counts = [50, 30, 20]
    state = remix.Remix(["a", "b", "c"], counts, "ref", None)
    initial = np.asarray(counts, float) / sum(counts)
    alpha, average = initial.copy(), initial.copy()
    assert np.allclose(state.initial, initial)
    for step, (proxy, ref, domains) in enumerate(_batches()):
        alpha, average, loss = ref_step(alpha, average, step, initial, proxy, ref, domains)
        p = torch.tensor(proxy, dtype=torch.float64, requires_grad=True)
        ours = state.objective(p, torch.tensor(ref, dtype=torch.float64), torch.tensor(domains))
        assert np.allclose(state.alpha, alpha, rtol=1e-12, atol=1e-14), (step, state.alpha, alpha)
        assert np.allclose(state.average, average, rtol=1e-12, atol=1e-14)
        assert float(ours.detach()) == pytest.approx(loss, rel=1e-12, abs=1e-14)
        # the gradient wrt each sample's proxy loss: alpha_d / (nonzero count of d's excess), as jax's grad gives
        ours.backward()
        D = 3
        norm = np.maximum(np.eye(D)[domains].T @ ((proxy - ref) != 0), 1.0)
        assert np.allclose(p.grad.numpy(), (alpha / norm)[domains])
    assert state.updates == 6
    # the result is the mean of alpha_1..alpha_T (train_remix.py:213 replaces alpha_0 at the first update)
    result = state.result()
    assert result.weights == state.average and result.initial == state.initial and sum(result.weights) == pytest.approx(1)


def test_smoothing_keeps_a_floor_and_step_size_sets_the_speed():
    state = remix.Remix(["easy", "hard"], [1, 1], "ref", None, step_size=0.2, smoothing=0.05)
    for _ in range(200):  # "hard" always has the larger excess: a factor exp(0.2 * 5) per step
        state.objective(torch.tensor([0.0, 5.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64), torch.tensor([0, 1]))
    # fixed point of a = 0.95 a / (a + (1 - a) e) + 0.025: above the floor smoothing x initial = 0.025
    assert state.alpha[0] == pytest.approx(0.038960, abs=1e-5) and state.alpha[1] == pytest.approx(1 - 0.038960, abs=1e-5)
    for _ in range(50):  # an excess of 50: exp(10) per step, the weight sits on the floor
        state.objective(torch.tensor([0.0, 50.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64), torch.tensor([0, 1]))
    assert state.alpha[0] == pytest.approx(0.05 * 0.5, rel=1e-3)
    with pytest.raises(ValueError, match="step size must be a number > 0"):
        remix.Remix(["a"], [1], "r", None, step_size=0)
    with pytest.raises(ValueError, match=r"smoothing must be in \[0, 1\]"):
        remix.Remix(["a"], [1], "r", None, smoothing=2)


def test_two_ranks_equal_one_process():
    """Each rank sees half the batch; the stats are summed across ranks and the loss is scaled by the world size,
    so the weights and the (rank-averaged) gradient equal one process on the whole batch."""
    proxy, ref, domains = next(_batches(batch=12, seed=3))
    one = remix.Remix(["a", "b", "c"], [2, 1, 1], "ref", None)
    p = torch.tensor(proxy, requires_grad=True)
    one.objective(p, torch.tensor(ref), torch.tensor(domains)).backward()
    halves = [slice(0, 5), slice(5, 12)]
    ranks = [remix.Remix(["a", "b", "c"], [2, 1, 1], "ref", None) for _ in halves]
    stats = [r.batch_stats(torch.tensor(proxy[h]), torch.tensor(ref[h]), torch.tensor(domains[h])) for r, h in zip(ranks, halves)]
    grads = []
    for k, (r, h) in enumerate(zip(ranks, halves)):
        ph = torch.tensor(proxy[h], requires_grad=True)
        other = stats[1 - k]
        r.objective(ph, torch.tensor(ref[h]), torch.tensor(domains[h]), world_size=2, all_reduce=lambda t, o=other: t.add_(o)).backward()
        grads.append(ph.grad)
        assert np.allclose(r.alpha, one.alpha, rtol=1e-12)
    assert torch.allclose(torch.cat(grads) / 2, p.grad)  # data parallelism averages the ranks' gradients


def test_per_sample_losses_are_the_batch_loss_per_sample():
    """From the real sparse-head output: each sample's mean CE over its labelled positions (+ its head loss), and
    with equal token counts their mean is the batch loss the forward returns."""
    from llava_vla_plugin.train.sparse_head import SparseHeadOutput, labelled_logits, labelled_rows

    torch.manual_seed(0)
    B, L, V = 4, 7, 30
    labels = torch.full((B, L), -100)
    labels[:, 3:6] = torch.randint(0, V, (B, 3))
    hidden = torch.randn(B, L, 5)
    head_lin = torch.nn.Linear(5, V)
    targets, logits = labelled_logits(head_lin, hidden, labels)
    batch_ce = torch.nn.functional.cross_entropy(logits, targets)
    pred, act = torch.randn(B, 2, 7), torch.randn(B, 2, 7)

    class Head:
        def loss(self, p, t):
            return torch.nn.functional.l1_loss(p, t)

    out = SparseHeadOutput(loss=batch_ce, logits=logits, targets=targets, target_rows=labelled_rows(labels))
    per = remix.per_sample_losses(out, B)
    assert per.mean().item() == pytest.approx(batch_ce.item(), rel=1e-6)
    manual = [torch.nn.functional.cross_entropy(head_lin(hidden[i, 2:5]), labels[i, 3:6]).item() for i in range(B)]
    assert np.allclose(per.detach().numpy(), manual, atol=1e-6)
    out = SparseHeadOutput(loss=batch_ce, logits=logits, targets=targets, target_rows=labelled_rows(labels),
                           action_pred=pred, action_targets=act)
    per = remix.per_sample_losses(out, B, Head())
    assert per.mean().item() == pytest.approx(batch_ce.item() + Head().loss(pred, act).item(), rel=1e-6)
    with pytest.raises(remix.RemixError, match="no vla_action_head"):
        remix.per_sample_losses(out, B)


# ---- the mixture tool ------------------------------------------------------------------------------------------
def _converted(root: Path, sizes: dict[str, int]) -> Path:
    from llava_vla_plugin.testing.vla_samples import write_vla_dataset

    for k, (name, n) in enumerate(sizes.items()):
        write_vla_dataset(root, name, n, image_fn=lambda i, r: np.full((8, 8, 3), 100, np.uint8),
                          action_fn=lambda i, r: [0.0] * 7, seed=k)
    return root


def test_mixture_tool_reads_learned_weights(tmp_path):
    conv = _converted(tmp_path / "conv", {"clean": 40, "noisy": 60})
    run = tmp_path / "proxy"
    run.mkdir()
    rw.RemixResult(domains=["clean", "noisy"], weights=[0.8, 0.2], initial=[0.4, 0.6], last=[0.9, 0.1], updates=3,
                   step_size=0.2, smoothing=0.05, reference=str(tmp_path / "ref")).write(run)
    out = tmp_path / "mix.yaml"
    proc = subprocess.run([os.sys.executable, "-m", "data_tools.mixture", "--converted", str(conv), "--weights",
                           str(run / rw.FILE_NAME), "-o", str(out)], capture_output=True, text=True, cwd=tmp_path, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    spec = yaml.safe_load(out.read_text())
    assert spec["vla_mixture"]["weighting"] == "remix" and spec["vla_mixture"]["weights"].startswith("remix:")
    shares = {r["name"]: r["effective_frames"] / spec["vla_mixture"]["effective_frames"] for r in spec["vla_mixture"]["datasets"]}
    assert shares == pytest.approx({"clean": 0.8, "noisy": 0.2}, abs=0.011)  # to one frame of 100
    from llava_vla_plugin.core.training_data import load_data, mixture_weighting, training_domains

    assert mixture_weighting(str(out)) == "remix"
    store, _ = load_data(str(out))
    names, of = training_domains(store)
    assert names == ["clean", "noisy"] and np.bincount(of).tolist() == [80, 20]
    for flags, msg in ((["--weights", str(run / rw.FILE_NAME), "--weighting", "balanced"], "use --weighting remix"),
                       (["--preset", "bridge", "--weighting", "remix"], "takes its weights from a Re-Mix proxy run")):
        proc = subprocess.run([os.sys.executable, "-m", "data_tools.mixture", "--converted", str(conv), *flags, "-o",
                               str(tmp_path / "x.yaml")], capture_output=True, text=True, cwd=tmp_path, env=subprocess_env())
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr
    (run / rw.FILE_NAME).write_text(json.dumps({"format": rw.FORMAT, "domains": ["clean"]}))
    with pytest.raises(rw.RemixFileError, match="incomplete Re-Mix result"):
        rw.read_result(run)


# ---- end to end ------------------------------------------------------------------------------------------------
def _clean_image(i, rng):
    c = i % 3
    img = rng.integers(0, 40, (48, 64, 3), dtype=np.uint8)
    img[..., c] = 230
    return img


@pytest.fixture(scope="module")
def remix_runs(tmp_path_factory):
    if not upstream_available():
        pytest.skip(UPSTREAM_REASON)
    from llava_vla_plugin.apps.tiny_model import build_tiny_model
    from llava_vla_plugin.testing.vla_samples import write_mixture, write_vla_dataset

    root = tmp_path_factory.mktemp("remix")
    tiny = build_tiny_model(root / "tiny", vision_layers=1)
    data = root / "conv"
    # clean: the image's colour sets every action value (learnable); noisy: uniform actions whatever the image
    write_vla_dataset(data, "clean", 36, image_fn=_clean_image, action_fn=lambda i, r: [(i % 3 - 1) * 1.5] * 6 + [float(i % 3 == 2)])
    write_vla_dataset(data, "noisy", 36, image_fn=_clean_image, seed=1,
                      action_fn=lambda i, r: list(r.uniform(-2, 2, 6)) + [float(r.integers(0, 2))])
    mix = write_mixture(data, [("clean", 1.0), ("noisy", 1.0)])

    def job(out, steps, **extra):
        env = {**tiny.env(), "MODEL": str(tiny.llava_dir), "VISION_TOWER": tiny.vision_tower, "DATA": str(mix),
               "IMAGE_FOLDER": str(data), "OUTPUT_DIR": str(out), "NUM_GPUS": "0", "BATCH_SIZE": "6",
               "MAX_STEPS": str(steps), "SAVE_STEPS": "10", "LR": "3e-3", "IMAGE_ASPECT_RATIO": "pad",
               "NUM_WORKERS": "0", "MODEL_MAX_LENGTH": "1024", **extra}
        # overrides, as tests/test_action_chunks.py (speed on 2 cores: no checkpointing, fused AdamW, LM + projector;
        # a constant LR: few steps must first move the 152k-id softmax onto the action rows)
        return {"env": env, "args": ["--gradient_checkpointing", "False", "--mm_tunable_parts", "mm_mlp_adapter,mm_language_model",
                                     "--seed", "0", "--optim", "adamw_torch_fused", "--lr_scheduler_type", "constant"]}

    ref, proxy, resumed = root / "reference", root / "proxy", root / "proxy_resumed"
    # the third and fourth jobs: the same proxy stopped after 10 steps, then continued to 20 (RESUME=auto)
    jobs = [job(ref, 60), job(proxy, 20, REMIX_REFERENCE=str(ref)), job(resumed, 10, REMIX_REFERENCE=str(ref)),
            job(resumed, 20, REMIX_REFERENCE=str(ref))]
    path = root / "jobs.json"
    path.write_text(json.dumps(jobs))
    proc = subprocess.run([os.sys.executable, "-m", "llava_vla_plugin.testing.inprocess_train", str(path)],
                          env=subprocess_env(tiny.env()), capture_output=True, text=True, timeout=1200, cwd=ROOT)
    for out in (ref, proxy, resumed):
        result = json.loads((out / "inprocess_result.json").read_text()) if (out / "inprocess_result.json").exists() else {}
        assert (out / "inprocess_result.json").exists() and "error" not in result, \
            result.get("error") or proc.stdout[-3000:] + proc.stderr[-6000:]
    return {"ref": ref, "proxy": proxy, "resumed": resumed, "data": data, "log": proc.stderr}


def test_proxy_run_moves_weight_from_noise_to_the_learnable_dataset(remix_runs):
    proxy = remix_runs["proxy"]
    result = rw.read_result(proxy)
    w, a0 = result.as_weights(), dict(zip(result.domains, result.initial))
    assert result.domains == ["clean", "noisy"] and a0 == pytest.approx({"clean": 0.5, "noisy": 0.5})
    assert result.updates == 20 and result.reference == str(remix_runs["ref"])
    print("Re-Mix weights", w, "last", result.last)
    # the rule's verdict: the domain the reference learned (positive excess) gains, noise loses
    assert w["clean"] > 0.6 > 0.4 > w["noisy"], w
    assert min(result.last) >= 0.05 * 0.5 - 1e-9  # the smoothing floor
    curve = rw.read_curve(proxy)
    assert [r["step"] for r in curve] == list(range(1, 21))
    assert np.mean([r["excess"]["clean"] for r in curve]) > np.mean([r["excess"]["noisy"] for r in curve])
    assert curve[-1]["average_alpha"] == pytest.approx(w)
    assert (proxy / rw.FIGURE_NAME).read_bytes()[:4] == b"\x89PNG"
    # the state in each checkpoint: a resumed proxy continues the average
    state = json.loads((proxy / "checkpoint-20" / remix.STATE_FILE).read_text())
    assert state["updates"] == 20 and state["average_alpha"] == pytest.approx(result.weights)
    state10 = json.loads((proxy / "checkpoint-10" / remix.STATE_FILE).read_text())
    assert state10["updates"] == 10
    assert state10["average_alpha"] == pytest.approx([curve[9]["average_alpha"][d] for d in result.domains])
    # the training log shows the weights; the reference run wrote no Re-Mix files
    assert "Re-Mix proxy run against" in remix_runs["log"] and not (remix_runs["ref"] / rw.FILE_NAME).exists()


def test_a_resumed_proxy_continues_its_weights(remix_runs):
    """Stopped at step 10 and resumed to 20: the weights continue from checkpoint-10's state (not from alpha_0), the
    curve has each step once, and the result is the uninterrupted run's."""
    full, resumed = rw.read_result(remix_runs["proxy"]), rw.read_result(remix_runs["resumed"])
    assert resumed.updates == 20
    assert [r["step"] for r in rw.read_curve(remix_runs["resumed"])] == list(range(1, 21))
    assert resumed.weights == pytest.approx(full.weights, rel=1e-4) and resumed.last == pytest.approx(full.last, rel=1e-4)
    assert "Re-Mix: continuing the domain weights of" in remix_runs["log"]


def test_proxy_writes_a_mixture_any_run_can_use(remix_runs):
    from llava_vla_plugin.core.training_data import load_data, training_domains

    mix = remix_runs["proxy"] / remix.MIXTURE_NAME
    spec = yaml.safe_load(mix.read_text())
    assert spec["vla_mixture"]["weighting"] == "remix"
    store, _ = load_data(str(mix))
    names, of = training_domains(store)
    w = rw.read_result(remix_runs["proxy"]).as_weights()
    shares = np.bincount(of) / len(of)
    assert shares == pytest.approx([w[n] for n in names], abs=1.0 / len(of))  # at the proxy's fraction (1): 72 frames


def test_launcher_refuses_bad_remix_input(tmp_path, remix_runs):
    """Before anything loads (preflight, rc 2): a missing reference, a folder that is not a finished run, gradient
    accumulation."""
    base = {"DATA": str(remix_runs["data"] / "mixture.yaml"), "IMAGE_FOLDER": str(remix_runs["data"]), "NUM_GPUS": "0",
            "OUTPUT_DIR": str(tmp_path / "out")}
    for extra, msg in (({"REMIX_REFERENCE": str(tmp_path / "nope")}, "REMIX_REFERENCE (--vla_remix_reference)"),
                       ({"REMIX_REFERENCE": str(remix_runs["data"])}, "not a finished run"),
                       ({"REMIX_REFERENCE": str(remix_runs["ref"]), "GRAD_ACCUM": "2"}, "set GRAD_ACCUM=1")):
        proc = subprocess.run(["bash", str(ROOT / "scripts/finetune_ov_vla.sh")], env=subprocess_env({**base, **extra}),
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "out").exists()
