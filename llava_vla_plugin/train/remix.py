"""Re-Mix in the trainer: a proxy run that learns dataset weights against a reference run (launcher
`REMIX_REFERENCE=<reference OUTPUT_DIR>`, trainer `--vla_remix_reference`).

The method and every rule, with the lines of the reference code, are in data_tools/remix_weights.py (the owner of
the update formula and of the files this writes). What this module adds is the part only training can do:
  * the per-sample loss of a batch, from the training forward's output (sparse_head.SparseHeadOutput): the mean
    cross-entropy of the sample's labelled tokens, plus its action head's loss for a representation with a head
    (parallel_l1), i.e. exactly the batch loss the run trains on, not reduced over the batch (Re-Mix's
    `loss(reduce=False)`);
  * the reference policy, loaded whole on every rank in eval mode, run on the same batch without gradient;
  * the update of the domain weights, identical on every rank: the per-domain sums are all-reduced first, so the
    weights follow the global batch as in Re-Mix's data-parallel JAX step;
  * the proxy objective sum_d alpha_d * (sum of domain d's unclipped excess) / (its nonzero count over the global
    batch), scaled by the world size because data parallelism averages the ranks' gradients: the gradient is the
    global batch's, whatever the number of processes;
  * the weights' state in every checkpoint (vla_remix_state.json), so a resumed proxy continues its average;
  * at the end: OUTPUT_DIR/remix_weights.json, the curve's figure, and OUTPUT_DIR/remix_mixture.yaml (an ordinary
    training mixture with those weights, where the proxy's data is a converted folder).

A domain is a dataset: the folder of the training data file a sample comes from (convert's OUT/<dataset>/train.jsonl;
core/training_data.training_domains).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from data_tools import remix_weights as rw
from data_tools.atomic import write_bytes, write_json

log = logging.getLogger(__name__)

STATE_FILE = "vla_remix_state.json"  # in each checkpoint-N: the weights' state at that step
MIXTURE_NAME = "remix_mixture.yaml"


class RemixError(ValueError):
    """A proxy run that cannot be made; the message says what to change."""


def per_sample_losses(out, batch_size: int, head=None) -> torch.Tensor:
    """[batch] the training loss of each sample (float32, with the graph of `out`): the mean cross-entropy of its
    labelled positions (sparse_head's logits / targets / target_rows) plus, where the representation has an action
    head, the head's own loss on that sample's rows. The mean over the samples of equal token counts is the batch
    loss sparse_head returns."""
    device = out.logits.device if out.logits is not None else out.action_pred.device
    losses = torch.zeros(batch_size, dtype=torch.float32, device=device)
    targets = getattr(out, "targets", None)
    if targets is not None and targets.numel():
        rows = out.target_rows.to(device)
        ce = F.cross_entropy(out.logits.float(), targets, reduction="none")
        sums = torch.zeros(batch_size, dtype=torch.float32, device=device).index_add(0, rows, ce)
        counts = torch.zeros(batch_size, dtype=torch.float32, device=device).index_add(0, rows, torch.ones_like(ce))
        losses = losses + sums / counts.clamp(min=1.0)
    pred = getattr(out, "action_pred", None)
    if pred is not None:
        if head is None:
            raise RemixError("the forward returned action predictions but the model has no vla_action_head")
        if pred.shape[0] != batch_size:
            raise RemixError(f"Re-Mix: {pred.shape[0]} action predictions for a batch of {batch_size} samples: every "
                             "training sample of a proxy run must be a robot-action sample")
        losses = losses + torch.stack([head.loss(pred[i:i + 1], out.action_targets[i:i + 1]).float() for i in range(batch_size)])
    return losses


def load_reference(path: str | os.PathLike, action_repr, tokenizer, device, dtype: torch.dtype, statistics: dict):
    """The reference run's model, whole, in eval mode, frozen; refused (RemixError, naming the file) unless it was
    trained with the same action representation, the same action tokens and the same statistics as this run: the
    excess loss only means something between two policies scoring the same targets."""
    from llava.model.builder import load_pretrained_model

    from llava_vla_plugin.core import checkpoint
    from llava_vla_plugin.core.env import default_attn_implementation
    from llava_vla_plugin.train import lora

    path = Path(path)
    try:
        ckpt = checkpoint.read(path)
    except checkpoint.CheckpointError as e:
        raise RemixError(f"REMIX_REFERENCE={path}: {e}") from None
    if ckpt.repr_config != action_repr.config:
        raise RemixError(f"REMIX_REFERENCE={path} was trained with {ckpt.repr_config}, this run with {action_repr.config}: "
                         "train the reference with the proxy's ACTION_REPR / HORIZON / REPR_OPTIONS / WINDOW_MODE")
    differ = sorted(k for k in statistics if ckpt.statistics.get(k) != statistics[k])
    if differ:
        raise RemixError(f"REMIX_REFERENCE={path}: its dataset_statistics.json differs from this run's data for "
                         f"{', '.join(differ)}: the reference must be trained on the proxy's datasets (same DATA)")
    name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    dev = str(device)
    if lora.is_lora_checkpoint(path):
        ref_tokenizer, model, _ = lora.load_lora_checkpoint(path, device=dev, torch_dtype=name,
                                                            attn_implementation=default_attn_implementation(), merge=True)
    else:
        ref_tokenizer, model, _, _ = load_pretrained_model(str(path), None, "llava_qwen", device_map=dev, torch_dtype=name,
                                                           attn_implementation=default_attn_implementation())
    if len(ref_tokenizer) != len(tokenizer) or ref_tokenizer.convert_tokens_to_ids(action_repr.action_tokenizer.tokens[:1]) \
            != tokenizer.convert_tokens_to_ids(action_repr.action_tokenizer.tokens[:1]):
        raise RemixError(f"REMIX_REFERENCE={path}: its tokenizer ({len(ref_tokenizer)} ids) is not this run's "
                         f"({len(tokenizer)} ids): train the reference from the proxy's MODEL")
    action_repr.load_into(model, ref_tokenizer, path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Remix:
    """The domain weights of one proxy run and their update (data_tools/remix_weights.py: the rules)."""

    def __init__(self, domains: list[str], domain_samples: list[int], reference: str, reference_model,
                 step_size: float = rw.REMIX_STEP_SIZE, smoothing: float = rw.REMIX_SMOOTHING):
        rw.check_hyperparameters(step_size, smoothing)
        self.domains, self.domain_samples = list(domains), [int(n) for n in domain_samples]
        self.reference, self.reference_model = str(reference), reference_model
        self.step_size, self.smoothing = float(step_size), float(smoothing)
        self.initial = rw.initial_alpha(self.domain_samples)
        self.alpha, self.average, self.updates = list(self.initial), list(self.initial), 0
        self.last_row: dict = {}

    # ---- one batch --------------------------------------------------------------------------------
    def batch_stats(self, proxy_losses: torch.Tensor, ref_losses: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """[7, D] float64 sums over this rank's samples, per domain: clipped excess, its nonzero count, unclipped excess,
        its nonzero count, proxy loss, reference loss, samples (all-reduced across ranks by `objective`)."""
        excess = (proxy_losses - ref_losses).detach().double()
        clipped = excess.clamp(min=0.0)
        one_hot = F.one_hot(domain.long().to(excess.device), len(self.domains)).T.to(torch.float64)  # [D, B]
        return torch.stack([one_hot @ clipped, one_hot @ (clipped != 0).double(), one_hot @ excess,
                            one_hot @ (excess != 0).double(), one_hot @ proxy_losses.detach().double(),
                            one_hot @ ref_losses.detach().double(), one_hot.sum(1)])

    def objective(self, proxy_losses: torch.Tensor, ref_losses: torch.Tensor, domain: torch.Tensor, world_size: int = 1,
                  all_reduce=None) -> torch.Tensor:
        """Update the weights from this batch and return the proxy's loss (train_remix.py:198-213)."""
        excess = proxy_losses - ref_losses.detach()
        one_hot = F.one_hot(domain.long().to(excess.device), len(self.domains)).T  # [D, B]
        stats = self.batch_stats(proxy_losses, ref_losses, domain)
        if all_reduce is not None:
            all_reduce(stats)
        s = stats.cpu().tolist()
        per_domain = rw.per_domain_mean(s[0], s[1])
        alpha = rw.update_alpha(self.alpha, self.initial, per_domain, self.step_size, self.smoothing)
        self.average = rw.update_average(self.average, alpha, self.updates)
        self.alpha, self.updates = alpha, self.updates + 1
        n = [max(c, 1.0) for c in s[6]]
        self.last_row = {"update": self.updates, "alpha": dict(zip(self.domains, alpha)),
                         "average_alpha": dict(zip(self.domains, self.average)),
                         "excess": dict(zip(self.domains, per_domain)),
                         "proxy_loss": {d: v / c for d, v, c in zip(self.domains, s[4], n)},
                         "reference_loss": {d: v / c for d, v, c in zip(self.domains, s[5], n)},
                         "samples": {d: int(c) for d, c in zip(self.domains, s[6])}}
        weights = torch.tensor([a / max(c, 1.0) for a, c in zip(alpha, s[3])], dtype=excess.dtype, device=excess.device)
        return float(world_size) * (one_hot.to(excess.dtype) @ excess * weights).sum()

    def log_values(self) -> dict:
        """Scalars for the trainer's log (alpha and excess loss of each domain)."""
        row = self.last_row
        out = {}
        for d in self.domains:
            if row:
                out[f"remix_alpha_{d}"] = row["alpha"][d]
                out[f"remix_excess_{d}"] = row["excess"][d]
        return out

    # ---- files ------------------------------------------------------------------------------------
    def append_curve(self, output_dir: str, step: int) -> None:
        with open(os.path.join(output_dir, rw.CURVE_NAME), "a") as f:
            f.write(json.dumps({"step": int(step), **self.last_row}) + "\n")

    def state(self) -> dict:
        return {"domains": self.domains, "alpha": self.alpha, "average_alpha": self.average, "updates": self.updates,
                "initial": self.initial, "reference": self.reference, "step_size": self.step_size, "smoothing": self.smoothing}

    def save_state(self, ckpt_dir: str) -> None:
        write_json(os.path.join(ckpt_dir, STATE_FILE), self.state())

    def resume(self, ckpt_dir: str, output_dir: str, step: int) -> None:
        """Continue the weights of checkpoint `ckpt_dir` (at `step`); curve rows after it are dropped (they are
        re-made by the resumed run)."""
        path = Path(ckpt_dir) / STATE_FILE
        if not path.is_file():
            raise RemixError(f"{ckpt_dir} has no {STATE_FILE}: it was not saved by a Re-Mix proxy run, so the weights cannot "
                             "continue. Resume a proxy run's checkpoint, or start a new proxy run in a new OUTPUT_DIR")
        state = json.loads(path.read_text())
        if state["domains"] != self.domains or state["initial"] != self.initial:
            raise RemixError(f"{path}: domains {state['domains']} (initial weights {state['initial']}) differ from this "
                             f"run's {self.domains} ({self.initial}): the data changed; start a new proxy run")
        self.alpha, self.average, self.updates = state["alpha"], state["average_alpha"], int(state["updates"])
        curve = Path(output_dir) / rw.CURVE_NAME
        if curve.is_file():
            kept = [line for line in curve.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
            curve.write_text("".join(line + "\n" for line in kept))
        log.warning("Re-Mix: continuing the domain weights of %s (%d updates)", ckpt_dir, self.updates)

    def result(self) -> rw.RemixResult:
        return rw.RemixResult(domains=self.domains, weights=self.average, initial=self.initial, last=self.alpha,
                              updates=self.updates, step_size=self.step_size, smoothing=self.smoothing,
                              reference=self.reference, domain_samples=self.domain_samples)

    def finish(self, output_dir: str, data_path: str) -> None:
        """remix_weights.json, its figure, and remix_mixture.yaml where the data is a converted folder."""
        result = self.result()
        path = result.write(output_dir)
        log.warning("Re-Mix: learned weights (average of %d updates) -> %s: %s", self.updates, path,
                    ", ".join(f"{d} {w:.4f} (from {a:.4f})" for d, w, a in zip(self.domains, self.average, self.initial)))
        try:
            write_bytes(os.path.join(output_dir, rw.FIGURE_NAME), render_curve(rw.read_curve(output_dir), result))
        except Exception as e:  # noqa: BLE001 - the weights matter, the picture does not
            log.warning("could not draw %s: %s", rw.FIGURE_NAME, e)
        write_mixture(output_dir, data_path, path)


def write_mixture(output_dir: str, data_path: str, result_path: Path) -> Optional[Path]:
    """OUTPUT_DIR/remix_mixture.yaml with the learned weights (weighting rule `remix`) at the fraction the proxy's
    own mixture recorded, when the proxy trained on a converted folder (OUT/<dataset>/train.jsonl); else a warning
    with the command that writes one."""
    import yaml

    from data_tools.training_mixture import MixtureToolError, plan_mixture, read_weights, write_training_mixture
    from llava_vla_plugin.core.training_data import parse_sources

    command = f"python -m data_tools.mixture --converted <converted folder> --weights {result_path} -o remix_mixture.yaml"
    try:
        sources = parse_sources(data_path)
        roots = {s.path.resolve().parent.parent for s in sources}
        fraction = 1.0
        if Path(data_path).suffix in (".yaml", ".yml"):
            record = (yaml.safe_load(Path(data_path).read_text()) or {}).get("vla_mixture") or {}
            fraction = float(record.get("fraction", 1.0))
        if len(roots) != 1:
            raise MixtureToolError(f"the proxy's data files are in {len(roots)} converted folders")
        label, weights = read_weights(weights=result_path)
        plan = plan_mixture(roots.pop(), weights, fraction, weights_source=label)
        out = write_training_mixture(plan, os.path.join(output_dir, MIXTURE_NAME), made_by="a Re-Mix proxy run")
    except (MixtureToolError, OSError, ValueError) as e:
        log.warning("Re-Mix: no %s written (%s); write one with: %s", MIXTURE_NAME, e, command)
        return None
    log.warning("Re-Mix: training mixture with the learned weights (fraction %g) -> %s", fraction, out)
    return out


def render_curve(rows: list[dict], result: rw.RemixResult) -> bytes:
    """alpha of each domain per step (solid), its running average (dashed) and alpha_0 (dotted), as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    for k, d in enumerate(result.domains):
        colour = f"C{k % 10}"
        ax.plot(steps, [r["alpha"][d] for r in rows], color=colour, label=f"{d}: alpha")
        ax.plot(steps, [r["average_alpha"][d] for r in rows], color=colour, linestyle="--",
                label=f"{d}: average -> {result.weights[k]:.3f}")
        ax.axhline(result.initial[k], color=colour, linestyle=":", linewidth=1)
    ax.set_xlabel("proxy step")
    ax.set_ylabel("domain weight")
    ax.set_ylim(0, 1)
    ax.set_title(f"Re-Mix domain weights ({result.updates} updates; dotted: initial)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
