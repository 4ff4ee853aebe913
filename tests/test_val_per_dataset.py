"""Per-dataset validation metrics (trainer.run_validation, issue 24 item 3), on the real run_validation, the real
sparse_head selection of labelled positions and the representations' real metrics objects, with a small
deterministic stand-in for the model (the launcher run in tests/test_launcher.py covers the real model).

What must hold: the mixture-wide numbers are those validation always computed (whole batches into one metrics
object); each dataset's numbers come from its own metrics object fed only its samples' rows; their token-weighted
combination is the mixture-wide number; and with two ranks, after the sums are reduced, rank 0 reports what one
process reports.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

trainer_mod = pytest.importorskip("llava_vla_plugin.train.trainer", reason="needs upstream LLaVA-NeXT (make setup)")
from llava_vla_plugin.core.action_tokenizer import ActionTokenizer  # noqa: E402
from llava_vla_plugin.core.representations.bins import ActionMetrics  # noqa: E402
from llava_vla_plugin.core.representations.parallel_l1 import RegressionMetrics  # noqa: E402
from llava_vla_plugin.train.sparse_head import SparseHeadOutput, labelled_logits, labelled_rows  # noqa: E402

IGNORE = -100
FIRST, BINS, VOCAB, L = 20, 16, 40, 9
# interleaved datasets of unequal sizes, so batches of 3 mix them; one sample has no `dataset` field (its file's folder)
NAMES = ["bridge_orig", "fractal", "bridge_orig", "lang table", "fractal", "bridge_orig", "lang table", "bridge_orig",
         "fractal", "bridge_orig", "fractal", "lang table", "bridge_orig", None]


def _samples():
    g = torch.Generator().manual_seed(0)
    out = []
    for i, name in enumerate(NAMES):
        ids = torch.randint(0, VOCAB, (L,), generator=g)
        labels = torch.full((L,), IGNORE)
        n_act = 3 if i % 2 else 4  # unequal token counts per sample
        labels[L - n_act - 1:L - 1] = torch.randint(FIRST, FIRST + BINS, (n_act,), generator=g)
        labels[L - 1] = 5  # <|im_end|>: labelled, not an action token
        meta = {"dataset": name} if name else {"_source": "/data/converted/kuka/val.jsonl"}
        out.append({"input_ids": ids, "labels": labels, "action_targets": torch.rand((2, 7), generator=g) * 2 - 1, **meta})
    return out


class ValSet(torch.utils.data.Dataset):
    def __init__(self):
        self.items = _samples()
        self.list_data_dict = [{k: v for k, v in s.items() if k in ("dataset", "_source")} for s in self.items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "labels", "action_targets")}


class Model:
    """A fixed random embedding + LM head (and a fixed 'action head'); the selection of labelled positions and the
    output type are sparse_head's own."""

    def __init__(self, regression: bool):
        torch.manual_seed(1)
        self.emb, self.head = torch.nn.Embedding(VOCAB, 8), torch.nn.Linear(8, VOCAB)
        self.regression, self.training = regression, False

    def eval(self):
        self.training = False

    def train(self):
        self.training = True

    def __call__(self, input_ids, labels, action_targets):
        hidden = self.emb(input_ids)
        targets, logits = labelled_logits(self.head, hidden, labels)
        pred = torch.tanh(hidden.mean(1)[:, :7]).unsqueeze(1).expand(-1, 2, -1) if self.regression else None
        return SparseHeadOutput(loss=None, logits=logits, targets=targets, target_rows=labelled_rows(labels),
                                action_pred=pred, action_targets=action_targets if self.regression else None)


def _trainer(tmp_path, regression: bool, rank: int = 0, world: int = 1, batch: int = 3):
    at = ActionTokenizer(n_bins=BINS, first_token_id=FIRST)
    metrics = (lambda: RegressionMetrics(at)) if regression else (lambda: ActionMetrics(at))
    logged = []
    fake = SimpleNamespace(
        val_dataset=ValSet(), data_collator=collate, model=Model(regression), _prepare_inputs=lambda b: b,
        action_repr=SimpleNamespace(metrics=metrics), log=logged.append, state=SimpleNamespace(global_step=7),
        args=SimpleNamespace(process_index=rank, world_size=world, per_device_eval_batch_size=batch,
                             dataloader_num_workers=0, device="cpu", should_save=rank == 0, output_dir=str(tmp_path)),
        last_val_metrics={}, _val_groups=None)
    return fake, logged, metrics


def _old_mixture_wide(fake, metrics) -> dict:
    """What run_validation computed before per-dataset metrics (one process): whole batches into one object."""
    m = metrics()
    loader = torch.utils.data.DataLoader(fake.val_dataset, batch_size=fake.args.per_device_eval_batch_size, collate_fn=collate)
    for batch in loader:
        m.update_output(fake.model(**batch), with_loss=True)
    n = max(m.total, 1)
    return {"val_action_loss": m.ce_sum / n, "val_action_accuracy_teacher_forced": m.correct / n,
            "val_action_accuracy_teacher_forced_constrained": m.constrained_correct / n,
            "val_action_l1": m.l1_sum / n, "val_action_tokens": m.total}


@pytest.mark.parametrize("regression", [False, True], ids=["bins", "parallel_l1"])
def test_per_dataset_metrics_combine_to_the_unchanged_mixture_wide_ones(tmp_path, regression):
    fake, logged, metrics = _trainer(tmp_path, regression)
    got = trainer_mod.VLATrainer.run_validation(fake)
    want = _old_mixture_wide(fake, metrics)
    assert {k: got[k] for k in want} == want  # mixture-wide: exactly as before
    names = {"bridge_orig": 6, "fractal": 4, "lang_table": 3, "kuka": 1}  # `lang table` -> a key-safe name; kuka: its folder
    assert {n: got[f"val_{n}_frames"] for n in names} == names
    tokens = {n: got[f"val_{n}_action_tokens"] for n in names}
    assert sum(tokens.values()) == got["val_action_tokens"] > 0
    for metric in ("action_loss", "action_accuracy_teacher_forced", "action_accuracy_teacher_forced_constrained", "action_l1"):
        combined = sum(got[f"val_{n}_{metric}"] * tokens[n] for n in names) / got["val_action_tokens"]
        # accuracies are integer counts (exact); loss and L1 are float32 sums taken in another grouping
        assert combined == pytest.approx(got[f"val_{metric}"], rel=1e-6, abs=1e-12), metric
    # the datasets differ (the split is real, not the mixture-wide number copied four times)
    assert len({round(got[f"val_{n}_action_l1"], 9) for n in names}) > 1
    # one dataset alone, computed independently, equals its per-dataset numbers
    m = metrics()
    only = [s for s in fake.val_dataset.items if s.get("dataset") == "fractal"]
    m.update_output(fake.model(**collate(only)), with_loss=True)
    assert got["val_fractal_action_accuracy_teacher_forced"] == m.correct / m.total
    assert got["val_fractal_action_l1"] == pytest.approx(m.l1_sum / m.total)
    # logged, and written to vla_metrics.jsonl
    assert logged == [got]
    row = json.loads((tmp_path / "vla_metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 7 and row["val_bridge_orig_action_accuracy_teacher_forced"] == got["val_bridge_orig_action_accuracy_teacher_forced"]


def test_two_ranks_reduce_to_the_one_process_numbers(tmp_path, monkeypatch):
    """Each rank validates every other sample; the per-dataset sums go through the same all_reduce as the
    mixture-wide ones, so rank 0's numbers after the reduction are the single process's."""
    single, _, _ = _trainer(tmp_path / "one", False)
    want = trainer_mod.VLATrainer.run_validation(single)
    sent = {}
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)  # asked by the DataLoader
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: sent.__setitem__("rank1", t.clone()))
    rank1, _, _ = _trainer(tmp_path / "r1", False, rank=1, world=2)
    trainer_mod.VLATrainer.run_validation(rank1)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.add_(sent["rank1"]))
    rank0, _, _ = _trainer(tmp_path / "r0", False, rank=0, world=2)
    got = trainer_mod.VLATrainer.run_validation(rank0)
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-6), k


def test_output_rows_needs_the_rows():
    out = SimpleNamespace(targets=torch.zeros(3, dtype=torch.long), logits=torch.zeros(3, 4), target_rows=None)
    with pytest.raises(RuntimeError, match="target_rows"):
        trainer_mod.output_rows(out, torch.tensor([True, False]))


def test_dataset_names_that_would_share_metric_keys_are_refused():
    assert trainer_mod.validation_groups([{"dataset": "a"}, {"_source": "/c/b/val.jsonl"}, {"dataset": "a"}])[0] == ["a", "b"]
    with pytest.raises(ValueError, match="'lang table' and 'lang_table'"):
        trainer_mod.validation_groups([{"dataset": "lang table"}, {"dataset": "lang_table"}])
