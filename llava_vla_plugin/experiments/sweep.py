"""A sweep is a file: a grid over data fraction, mixture, base model, steps and action representation -> one run
directory each.

    python -m llava_vla_plugin.experiments.sweep SPEC.yaml -o RUNS [--launch | --print] [--dry-run]

SPEC (see configs/sweeps/example.yaml; relative paths resolve against the current directory)::

    name: bridge_scaling                 # optional, defaults to the file name
    converted: converted                 # output folder of data_tools convert
    image_folder: converted              # optional, defaults to `converted`
    val_data: auto                       # auto (default): <dataset>/val.jsonl of every dataset the sweep's
                                         # mixtures use, one RUNS/val_mixture.yaml shared by all runs;
                                         # or a jsonl / mixture path; or null (no validation)
    val_per_dataset: 2000                # optional, with auto: a fixed random subset per dataset
    weighting: balanced                  # default: OpenVLA's balance_weights (shares ~ weight x num_transitions);
                                         # kept_frames, weights, temperature (+ alpha: 0.43): data_tools/training_mixture.py;
                                         # a mixture whose weights file is a Re-Mix result (RUN/remix_weights.json) is `remix`
                                         # (`balance: true|false`, the older spelling: balanced | weights)
    seed: 0                              # data seed: data_tools.mixture --seed and --vla_data_seed
    finetune_script: scripts/finetune_ov_vla.sh    # optional
    env: {NUM_GPUS: 8, BATCH_SIZE: 8, LR: 2e-5, EVAL_STEPS: 500}   # finetune_ov_vla.sh variables
    args: [--report_to, wandb]           # extra trainer arguments, every run
    grid:
      fraction: [0.125, 0.25, 0.5, 1.0]
      mixture: [bridge, my_weights.yaml, {name: bridge_heavy, weights: {bridge_orig: 3, fractal20220817_data: 1}}]
      model: [lmms-lab/llava-onevision-qwen2-0.5b-ov, {name: tiny, path: /models/tiny-qwen, vision_tower: tiny-vla/siglip-tiny}]
      steps: [2000]                      # MAX_STEPS (-1: EPOCHS epochs)
      action_repr: [bins, {repr: bins_chunk, horizon: 8}, {repr: parallel_l1, horizon: 8, window_mode: oft},
                    {name: fast-v1024, repr: fast, horizon: 8, options: {tokenizer: fast_tok_1024/}}]
                                         # optional: ACTION_REPR / HORIZON / WINDOW_MODE / REPR_OPTIONS
                                         # (llava_vla_plugin/core/representations/; fast's vocabulary size: one
                                         # vla-fit-fast --vocab_size V tokenizer per entry)
      train_seed: [0, 1, 2]              # optional: the launcher's SEED per run (repeats to compare against noise;
                                         # `python -m llava_vla_plugin.experiments.mixture_compare RUNS` pools them)
    closed_loop:                         # optional: after training, each finished run served and run through
      benchmarks: [lift]                 # vla-eval -> RUNS/<run>/closed_loop/report.json; every key:
      episodes: 2                        # llava_vla_plugin/experiments/closed_loop_study.py

A mixture is a preset name (data_tools/mixtures/NAME.yaml), a weights file, or a mapping
{name, weights: FILE or {dataset: weight}, weighting, alpha, balance}: its own rule, else the sweep's. A model is a hub id or path, or a mapping
{name, path, vision_tower, env, args}. An action representation is a name (H = 1) or a mapping
{name, repr, horizon, window_mode, options}; without the axis, runs use the env's (default: bins, H = 1) and their
names and configs are as before.

RUNS gets, per grid point, RUNS/<run>/ with mixture.yaml (data_tools.mixture), config.json (the grid
point and everything the run is made of) and launch.sh (environment + scripts/finetune_ov_vla.sh, output
RUNS/<run>/out, log RUNS/<run>/train.log; FINETUNE_SCRIPT overrides the script). RUNS/launch_all.sh runs
them one after another. A run whose out/final_metrics.json exists is finished: launch.sh, launch_all.sh,
--launch and --print skip it. An unfinished run relaunched resumes from its last checkpoint.

  (default)   write the run directories and launchers, print the plan
  --launch       write, then run RUNS/launch_all.sh; then, with `closed_loop:`, evaluate every finished run
                 lacking <run>/closed_loop/report.json (runs with one are skipped)
  --closed-loop  only that closed-loop step (after training done elsewhere, e.g. the --print commands)
  --print        write, then print one command per unfinished run (for a cluster scheduler)
  --dry-run      write and run nothing; print the plan (with --launch / --closed-loop / --print: the commands,
                 the closed-loop server and vla-eval commands included)
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from data_tools.cli import add_common_flags, add_output, setup_logging
from data_tools.atomic import write_text_if_changed
from data_tools.training_mixture import (REMIX_SOURCE, MixturePlan, MixtureToolError, plan_mixture, read_weights,
                                        write_training_mixture)
from llava_vla_plugin.experiments.closed_loop_study import (ClosedLoopSpecError, check_runs, evaluate_runs,
                                                            parse_closed_loop)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_FINETUNE_SCRIPT = ROOT / "scripts" / "finetune_ov_vla.sh"
FINAL_METRICS = "final_metrics.json"
GRID_AXES = ("fraction", "mixture", "model", "steps", "action_repr", "train_seed")
SPEC_KEYS = {"name", "converted", "image_folder", "val_data", "val_per_dataset", "balance", "weighting", "alpha", "seed", "finetune_script",
             "env", "args", "grid", "description", "closed_loop"}
# Set by the sweep itself; the spec sets them through `grid`, `converted`, `image_folder` and `val_data`.
RESERVED_ENV = {"MODEL", "DATA", "OUTPUT_DIR", "MAX_STEPS", "IMAGE_FOLDER", "VAL_DATA"}
ACTION_ENV = ("ACTION_REPR", "HORIZON", "WINDOW_MODE", "REPR_OPTIONS")  # set by the `action_repr` axis where the spec has one

__all__ = ["SweepError", "Run", "load_spec", "plan_sweep", "write_sweep", "run_status", "main"]


class SweepError(ValueError):
    """A spec that cannot be turned into runs; the message says what to fix."""


@dataclass
class Run:
    name: str
    dir: Path
    config: dict[str, Any]
    mixture: MixturePlan
    env: dict[str, str]
    args: list[str]

    @property
    def out_dir(self) -> Path:
        return self.dir / "out"

    @property
    def finished(self) -> bool:
        return (self.out_dir / FINAL_METRICS).is_file()

    @property
    def launch_script(self) -> Path:
        return self.dir / "launch.sh"


# ----------------------------------------------------------------------------------------------
# Spec


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env(raw: Any, where: str) -> dict[str, str]:
    """An `env:` mapping with names a shell accepts: launch.sh writes `export NAME=value`, so a key such as
    "X=1; touch /tmp/p; Y" must be refused here (values are shlex-quoted where they are written)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SweepError(f"{where}: `env` must be a mapping of VARIABLE: value")
    bad = [str(k) for k in raw if not _ENV_NAME.fullmatch(str(k))]
    if bad:
        raise SweepError(f"{where}: env names must be shell variable names (letters, digits, _; not starting "
                         f"with a digit): {', '.join(map(repr, bad))}")
    return {str(k): str(v) for k, v in raw.items()}


def _comment(text: Any) -> str:
    """Text safe on one shell comment line (a newline would start a command)."""
    return re.sub(r"[\r\n]+", " ", str(text))


def _label(text: str) -> str:
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")
    if not label:
        raise SweepError(f"cannot make a run-name label from {text!r}; give the entry a `name:`")
    return label


def _abs(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def load_spec(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SweepError(f"cannot read sweep spec {path}: {e}") from None
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(spec, Mapping):
        raise SweepError(f"{path}: expected a mapping with `converted` and `grid`")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    spec = dict(spec)
    spec.setdefault("name", path.stem)
    spec["_path"] = str(path.resolve())
    return spec


def _mixture_entries(raw: Any) -> list[dict[str, Any]]:
    entries = []
    for item in _as_list(raw):
        if isinstance(item, str):
            p = Path(item)
            if p.is_file():
                label, weights = read_weights(weights=p)
                learned = label.startswith(REMIX_SOURCE)  # a Re-Mix result: the source keeps the rule's marker
                entries.append({"label": _label(f"remix_{p.resolve().parent.name}" if learned else p.stem),
                                "source": label if learned else str(p.resolve()), "weights": weights, "balance": None,
                                "weighting": None, "alpha": None})
            else:
                label, weights = read_weights(preset=item)  # error lists the shipped presets
                entries.append({"label": _label(item), "source": f"preset:{item}", "weights": weights, "balance": None,
                                "weighting": None, "alpha": None})
        elif isinstance(item, Mapping):
            unknown = set(item) - {"name", "weights", "preset", "balance", "weighting", "alpha"}
            if unknown:
                raise SweepError(f"grid.mixture entry {dict(item)}: unknown key(s) {sorted(unknown)} (name, weights, preset, balance, weighting, alpha)")
            if ("weights" in item) == ("preset" in item):
                raise SweepError(f"grid.mixture entry {dict(item)}: give exactly one of `weights` and `preset`")
            if "preset" in item:
                _, weights = read_weights(preset=str(item["preset"]))
                source, default_name = f"preset:{item['preset']}", str(item["preset"])
            elif isinstance(item["weights"], Mapping):
                if "name" not in item:
                    raise SweepError(f"grid.mixture entry with inline weights needs a `name`: {dict(item)}")
                _, weights = read_weights(weights=item["weights"])
                source, default_name = "inline", ""
            else:
                p = Path(str(item["weights"]))
                label, weights = read_weights(weights=p)
                source, default_name = (label if label.startswith(REMIX_SOURCE) else str(p.resolve())), p.stem
            balance = item.get("balance")
            if balance is not None and not isinstance(balance, bool):
                raise SweepError(f"grid.mixture entry {dict(item)}: `balance` must be true or false")
            entries.append({"label": _label(str(item.get("name") or default_name)), "source": source,
                            "weights": weights, "balance": balance, "weighting": item.get("weighting"),
                            "alpha": item.get("alpha")})
        else:
            raise SweepError(f"grid.mixture: expected a preset name, a weights file or a mapping, got {item!r}")
    return entries


def _model_entries(raw: Any) -> list[dict[str, Any]]:
    entries = []
    for item in _as_list(raw):
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, Mapping) or "path" not in item:
            raise SweepError(f"grid.model: expected a hub id / path or a mapping with `path`, got {item!r}")
        unknown = set(item) - {"name", "path", "vision_tower", "env", "args"}
        if unknown:
            raise SweepError(f"grid.model entry {dict(item)}: unknown key(s) {sorted(unknown)} (name, path, vision_tower, env, args)")
        path = str(item["path"])
        if Path(path).expanduser().exists():
            path = str(_abs(path))
        env = _env(item.get("env"), f"grid.model entry {item.get('name') or path}")
        if item.get("vision_tower"):
            env["VISION_TOWER"] = str(item["vision_tower"])
        bad = RESERVED_ENV & set(env)
        if bad:
            raise SweepError(f"grid.model entry {item.get('name') or path}: env may not set {sorted(bad)}")
        entries.append({"label": _label(str(item.get("name") or Path(path.rstrip("/")).name)), "path": path,
                        "env": env, "args": [str(a) for a in item.get("args") or []]})
    return entries


def _weighting_rule(entry: Mapping[str, Any], weighting: Any, balance: Any, alpha: Any) -> tuple[Any, Any, Any]:
    """(weighting, balance, alpha) for plan_mixture: a mixture entry's own rule (`weighting`, or the older
    `balance`) wins over the sweep's; the sweep's alpha only reaches a temperature rule. plan_mixture checks the
    values (an unknown rule, a bad alpha, balance contradicting weighting) and names them."""
    own = entry.get("weighting") is not None or entry.get("balance") is not None
    if own:
        weighting, balance = entry.get("weighting"), entry.get("balance")
    elif str(entry.get("source", "")).startswith(REMIX_SOURCE):  # learned Re-Mix weights carry their own rule
        weighting, balance = "remix", None
    rule = weighting if weighting is not None else ("weights" if balance is False else "balanced")
    if entry.get("alpha") is not None:
        alpha = entry["alpha"]
    elif rule != "temperature":
        alpha = None
    return weighting, balance, alpha


def _fractions(raw: Any) -> list[float]:
    out = []
    for f in _as_list(raw):
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0:
            raise SweepError(f"grid.fraction: every value must be a number > 0, got {f!r}")
        out.append(float(f))
    return out


def _steps(raw: Any) -> list[int]:
    out = []
    for s in _as_list(raw):
        if isinstance(s, bool) or not isinstance(s, int) or not (s > 0 or s == -1):
            raise SweepError(f"grid.steps: every value must be a positive integer (or -1 for full epochs), got {s!r}")
        out.append(s)
    return out


def _action_entries(raw: Any) -> list[dict[str, Any]]:
    """grid.action_repr: each entry -> {label, env} with the launcher's ACTION_REPR / HORIZON / WINDOW_MODE,
    checked by the representation's own config (a bad name or `bins` with H > 1 fails here, not on the cluster)."""
    from llava_vla_plugin.core.representations import ActionReprConfig, ActionReprError, representation_class

    entries = []
    for item in _as_list(raw):
        if isinstance(item, str):
            item = {"repr": item}
        if not isinstance(item, Mapping) or "repr" not in item:
            raise SweepError(f"grid.action_repr: expected a representation name or a mapping with `repr`, got {item!r}")
        unknown = set(item) - {"name", "repr", "horizon", "window_mode", "options"}
        if unknown:
            raise SweepError(f"grid.action_repr entry {dict(item)}: unknown key(s) {sorted(unknown)} "
                             "(name, repr, horizon, window_mode, options)")
        horizon = item.get("horizon", 1)
        if isinstance(horizon, bool) or not isinstance(horizon, int):
            raise SweepError(f"grid.action_repr entry {dict(item)}: `horizon` must be an integer")
        options = item.get("options", {})
        if not isinstance(options, Mapping):
            raise SweepError(f"grid.action_repr entry {dict(item)}: `options` must be a mapping, e.g. "
                             "{tokenizer: fast_tok_1024/} for fast")
        # a value naming an existing file or folder (fast's tokenizer=DIR) resolves against the current directory,
        # as every path of the spec does, so the run's launcher finds it from wherever it runs
        options = {str(k): (str(_abs(v)) if Path(str(v)).exists() else str(v)) for k, v in options.items()}
        if any("," in k + v or "=" in k for k, v in options.items()):
            raise SweepError(f"grid.action_repr entry {dict(item)}: option names and values cannot contain ',' "
                             "(and names not '=')")
        try:  # the registry's checks, then the class's own (fast: its tokenizer exists and was fitted for this H)
            cfg = ActionReprConfig(name=str(item["repr"]), horizon=horizon, window_mode=str(item.get("window_mode", "oft")),
                                   options=options)
            representation_class(cfg.name).check_options(cfg)
        except ActionReprError as e:
            raise SweepError(f"grid.action_repr entry {dict(item)}: {e}") from None
        env = {"ACTION_REPR": cfg.name, "HORIZON": str(cfg.horizon)}
        default_label = cfg.name if cfg.horizon == 1 else f"{cfg.name}-H{cfg.horizon}"
        if "window_mode" in item:
            env["WINDOW_MODE"] = cfg.window_mode
            default_label += f"-{cfg.window_mode}"
        if options:
            env["REPR_OPTIONS"] = ",".join(f"{k}={v}" for k, v in options.items())
            if "name" not in item:
                default_label += "-" + "-".join(Path(v).name or v for v in options.values())
        entries.append({"label": _label(str(item.get("name") or default_label)), "env": env, "config": cfg})
    return entries


def _unique(labels: list[str], axis: str) -> None:
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise SweepError(f"grid.{axis}: duplicate label(s) {dup}; give the entries distinct `name:`s")


def run_name(fraction: float, mixture: str, steps: int, model: str, action: str | None = None,
             train_seed: int | None = None) -> str:
    name = f"frac{fraction:g}-mix_{mixture}-steps{'all' if steps == -1 else steps}-model_{model}"
    name = name if action is None else f"{name}-action_{action}"
    return name if train_seed is None else f"{name}-seed{train_seed}"


def _train_seeds(raw: Any) -> list[int]:
    """grid.train_seed: the launcher's SEED (model initialisation, data order) per run; the data seed (`seed:`,
    which subset a fraction keeps) stays one, so runs that differ only in train_seed train on the same frames."""
    out = []
    for s in _as_list(raw):
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise SweepError(f"grid.train_seed: every value must be a non-negative integer, got {s!r}")
        out.append(s)
    return out


def plan_sweep(spec: Mapping[str, Any], runs_dir: str | Path) -> tuple[list[Run], dict[str, Any]]:
    """Runs of the grid (nothing written). Returns (runs, sweep-level info)."""
    runs_dir = _abs(runs_dir)
    where = spec.get("_path", "spec")
    if not spec.get("converted"):
        raise SweepError(f"{where}: `converted` (the data_tools convert output folder) is required")
    converted = _abs(spec["converted"])
    if not converted.is_dir():
        raise SweepError(f"{where}: converted folder {converted} does not exist")
    image_folder = _abs(spec.get("image_folder") or converted)
    grid = spec.get("grid")
    if not isinstance(grid, Mapping):
        raise SweepError(f"{where}: `grid` must be a mapping with {', '.join(GRID_AXES)}")
    unknown = set(grid) - set(GRID_AXES)
    if unknown:
        raise SweepError(f"{where}: unknown grid axis {sorted(unknown)}; axes: {', '.join(GRID_AXES)}")
    missing = [a for a in ("mixture", "model") if a not in grid]
    if missing:
        raise SweepError(f"{where}: grid needs {', '.join(missing)}")
    try:
        fractions = _fractions(grid.get("fraction", [1.0]))
        mixtures = _mixture_entries(grid["mixture"])
    except MixtureToolError as e:
        raise SweepError(f"{where}: {e}") from None
    models = _model_entries(grid["model"])
    steps = _steps(grid.get("steps", [-1]))
    actions = _action_entries(grid["action_repr"]) if "action_repr" in grid else [None]
    train_seeds = _train_seeds(grid["train_seed"]) if "train_seed" in grid else [None]
    _unique([f"{f:g}" for f in fractions], "fraction")
    _unique([m["label"] for m in mixtures], "mixture")
    _unique([m["label"] for m in models], "model")
    _unique([str(s) for s in steps], "steps")
    if actions != [None]:
        _unique([a["label"] for a in actions], "action_repr")
    if train_seeds != [None]:
        _unique([str(t) for t in train_seeds], "train_seed")

    balance_default = spec.get("balance")
    if balance_default is not None and not isinstance(balance_default, bool):
        raise SweepError(f"{where}: `balance` must be true or false")
    seed = spec.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SweepError(f"{where}: `seed` must be an integer")
    fixed_env = _env(spec.get("env"), where)
    bad = RESERVED_ENV & set(fixed_env)
    if bad:
        raise SweepError(f"{where}: env may not set {sorted(bad)}: the sweep sets them (use grid, converted, "
                         "image_folder, val_data)")
    if actions != [None]:
        clash = sorted(set(ACTION_ENV) & (set(fixed_env) | {k for m in models for k in m["env"]}))
        if clash:
            raise SweepError(f"{where}: env sets {clash} and grid.action_repr sweeps them: set them in one place")
    if train_seeds != [None]:
        clash = sorted({"SEED"} & (set(fixed_env) | {k for m in models for k in m["env"]}))
        if clash or "--seed" in [str(a) for a in spec.get("args") or []]:
            raise SweepError(f"{where}: grid.train_seed sets SEED per run; drop SEED from env and --seed from args")
    extra_args = [str(a) for a in spec.get("args") or []]
    try:
        closed_loop = parse_closed_loop(spec.get("closed_loop"))
    except ClosedLoopSpecError as e:
        raise SweepError(f"{where}: {e}") from None
    script = spec.get("finetune_script")
    finetune_script = str(_abs(script)) if script else str(DEFAULT_FINETUNE_SCRIPT)

    # Mixture plans (one per mixture x fraction; independent of model and steps).
    plans: dict[tuple[str, float], MixturePlan] = {}
    try:
        for m, f in itertools.product(mixtures, fractions):
            weighting, balance, alpha = _weighting_rule(m, spec.get("weighting"), balance_default, spec.get("alpha"))
            plans[m["label"], f] = plan_mixture(converted, m["weights"], f, balance, seed, weights_source=m["source"],
                                                weighting=weighting, alpha=alpha)
    except MixtureToolError as e:
        raise SweepError(f"{where}: mixture: {e}") from None

    # Validation data, shared by every run so their numbers compare.
    val_spec = spec.get("val_data", "auto")
    val_info: dict[str, Any] = {"mode": "none", "path": None}
    if val_spec == "auto":
        used = sorted({r.name for p in plans.values() for r in p.rows})
        files = [converted / n / "val.jsonl" for n in used]
        present = [f for f in files if f.is_file() and f.stat().st_size > 0]
        if not present:
            raise SweepError(f"{where}: val_data: auto found no non-empty val.jsonl for {', '.join(used)} in {converted}; "
                             "give val_data a path, or null to train without validation")
        per = spec.get("val_per_dataset")
        if per is not None and (isinstance(per, bool) or not isinstance(per, int) or per <= 0):
            raise SweepError(f"{where}: val_per_dataset must be a positive integer")
        val_info = {"mode": "auto", "path": str(runs_dir / "val_mixture.yaml"), "files": [str(f) for f in present],
                    "missing": [str(f) for f in files if f not in present], "per_dataset": per}
    elif val_spec:
        p = _abs(val_spec)
        if not p.exists():
            raise SweepError(f"{where}: val_data {p} does not exist")
        val_info = {"mode": "path", "path": str(p)}

    runs = []
    for f, m, model, s, action, ts in itertools.product(fractions, mixtures, models, steps, actions, train_seeds):
        name = run_name(f, m["label"], s, model["label"], action and action["label"], ts)
        plan = plans[m["label"], f]
        env = {**fixed_env, **model["env"], **(action["env"] if action else {}), "MODEL": model["path"],
               "IMAGE_FOLDER": str(image_folder), "MAX_STEPS": str(s)}
        if ts is not None:
            env["SEED"] = str(ts)
        if val_info["path"]:
            env["VAL_DATA"] = val_info["path"]
        args = ["--vla_data_seed", str(seed), *extra_args, *model["args"]]
        config = {
            "sweep": spec.get("name"), "spec": spec.get("_path"), "run": name,
            "fraction": f, "mixture": m["label"], "mixture_source": m["source"], "mixture_weights": m["weights"],
            "balance": plan.balance, "weighting": plan.weighting, "temperature_alpha": plan.alpha, "model": model["label"], "model_path": model["path"], "steps": s, "seed": seed,
            "converted": str(converted), "val_data": val_info["path"],
            "planned_train_frames": plan.effective_total,
            "mixture_shares": {r.name: r.share for r in plan.rows},
            "env": dict(sorted(env.items())), "args": args, "finetune_script": finetune_script,
        }
        if action:  # only with the axis: configs of sweeps written before it stay byte-identical
            config.update(action_repr=action["label"], action_repr_config=asdict(action["config"]))
        if ts is not None:  # likewise
            config["train_seed"] = ts
        runs.append(Run(name, runs_dir / name, config, plan, env, args))
    info = {"name": spec.get("name"), "spec": spec.get("_path"), "runs_dir": str(runs_dir), "val": val_info,
            "finetune_script": finetune_script, "runs": [r.name for r in runs]}
    if closed_loop is not None:  # only with the section: sweep.json of sweeps without one stays byte-identical
        try:
            check_runs(closed_loop, runs)
        except ClosedLoopSpecError as e:
            raise SweepError(f"{where}: {e}") from None
        info["closed_loop"] = closed_loop
    return runs, info


# ----------------------------------------------------------------------------------------------
# Writing


def _write_if_changed(path: Path, text: str, executable: bool = False) -> None:
    write_text_if_changed(path, text)
    if executable:
        path.chmod(0o755)


def launch_sh(run: Run) -> str:
    q = shlex.quote
    exports = "".join(f"export {k}={q(v)}\n" for k, v in sorted(run.env.items()))
    args = " ".join(q(a) for a in run.args)
    action = f", action_repr {_comment(run.config['action_repr'])}" if "action_repr" in run.config else ""
    return f"""#!/usr/bin/env bash
# Run {run.name} of sweep {_comment(run.config['sweep'])} (generated by llava_vla_plugin.experiments.sweep; edit the spec, not this file).
# fraction {run.config['fraction']:g}, mixture {_comment(run.config['mixture'])}, model {_comment(run.config['model'])}, steps {run.config['steps']}{action};
# {run.config['planned_train_frames']} train frames. Extra arguments go to the trainer. FINETUNE_SCRIPT overrides the script.
set -euo pipefail
RUN_DIR="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
if [ -f "$RUN_DIR/out/{FINAL_METRICS}" ]; then
  echo "[sweep] {run.name}: finished (out/{FINAL_METRICS} exists), skipped"
  exit 0
fi
{exports}export DATA="$RUN_DIR/mixture.yaml"
export OUTPUT_DIR="$RUN_DIR/out"
DEFAULT_FINETUNE_SCRIPT={q(run.config['finetune_script'])}
FINETUNE_SCRIPT="${{FINETUNE_SCRIPT:-$DEFAULT_FINETUNE_SCRIPT}}"
mkdir -p "$OUTPUT_DIR"
echo "[sweep] {run.name}: $FINETUNE_SCRIPT -> $OUTPUT_DIR (log: $RUN_DIR/train.log)"
bash "$FINETUNE_SCRIPT" {args} "$@" 2>&1 | tee -a "$RUN_DIR/train.log"
if [ ! -f "$OUTPUT_DIR/{FINAL_METRICS}" ]; then
  echo "[sweep] {run.name}: training ended without out/{FINAL_METRICS} (is VAL_DATA set and supported?)" >&2
fi
"""


def launch_all_sh(runs: list[Run], info: Mapping[str, Any]) -> str:
    names = " ".join(shlex.quote(r.name) for r in runs)
    return f"""#!/usr/bin/env bash
# Every run of sweep {_comment(info['name'])}, one after another (generated by llava_vla_plugin.experiments.sweep).
# Finished runs (<run>/out/{FINAL_METRICS}) are skipped; a failed run is reported and the next one starts
# (STOP_ON_FAILURE=1 stops instead). Extra arguments go to every run's trainer.
set -uo pipefail
cd "$(dirname "${{BASH_SOURCE[0]}}")"
RUNS=({names})
ran=0; skipped=0; failed=()
for r in "${{RUNS[@]}}"; do
  if [ -f "$r/out/{FINAL_METRICS}" ]; then
    echo "[sweep] skipped (finished): $r"; skipped=$((skipped + 1)); continue
  fi
  echo "[sweep] running: $r"
  if bash "$r/launch.sh" "$@"; then
    ran=$((ran + 1))
  else
    echo "[sweep] FAILED: $r (see $r/train.log)" >&2; failed+=("$r")
    if [ "${{STOP_ON_FAILURE:-0}}" = "1" ]; then break; fi
  fi
done
echo "[sweep] ran $ran, skipped $skipped, failed ${{#failed[@]}}${{failed[*]:+: ${{failed[*]}}}}"
[ "${{#failed[@]}}" -eq 0 ]
"""


def _val_mixture_text(info: Mapping[str, Any]) -> str:
    val = info["val"]
    strategy = f"random:{val['per_dataset']}" if val.get("per_dataset") else "all"
    spec = {"datasets": [{"json_path": f, "sampling_strategy": strategy, "weight": 1.0} for f in val["files"]]}
    head = f"# Held-out episodes shared by every run of sweep {_comment(info['name'])} (generated by llava_vla_plugin.experiments.sweep).\n"
    head += "".join(f"# no val.jsonl (or empty): {m}\n" for m in val.get("missing", []))
    return head + yaml.safe_dump(spec, sort_keys=False)


def write_sweep(runs: list[Run], info: Mapping[str, Any]) -> None:
    runs_dir = Path(info["runs_dir"])
    # Refuse to rewrite a started run with a different configuration: its results would be mislabelled.
    for run in runs:
        cfg_path = run.dir / "config.json"
        if cfg_path.exists() and run.out_dir.exists():
            try:
                old = json.loads(cfg_path.read_text())
            except ValueError:
                old = None
            if old != json.loads(json.dumps(run.config)):
                diff = sorted(k for k in set(old or {}) | set(run.config) if (old or {}).get(k) != json.loads(json.dumps(run.config)).get(k))
                raise SweepError(f"run {run.name} in {runs_dir} was started with a different configuration (differs in: "
                                 f"{', '.join(diff)}); write the sweep to a new -o folder or delete {run.dir}")
    runs_dir.mkdir(parents=True, exist_ok=True)
    if info["val"]["mode"] == "auto":
        _write_if_changed(Path(info["val"]["path"]), _val_mixture_text(info))
    for run in runs:
        run.dir.mkdir(parents=True, exist_ok=True)
        write_training_mixture(run.mixture, run.dir / "mixture.yaml")
        _write_if_changed(run.dir / "config.json", json.dumps(run.config, indent=2, sort_keys=True) + "\n")
        _write_if_changed(run.launch_script, launch_sh(run), executable=True)
    _write_if_changed(runs_dir / "launch_all.sh", launch_all_sh(runs, info), executable=True)
    _write_if_changed(runs_dir / "sweep.json", json.dumps(info, indent=2, sort_keys=True) + "\n")


def run_status(run: Run) -> str:
    if run.finished:
        return "finished"
    if run.out_dir.exists():
        return "started"
    return "new"


def format_plan(runs: list[Run]) -> str:
    head = ["run", "status", "train frames"]
    rows = [[r.name, run_status(r), f"{r.config['planned_train_frames']:,}"] for r in runs]
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(3)]
    fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([fmt(head), *map(fmt, rows)])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava_vla_plugin.experiments.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="sweep spec YAML")
    add_output(p, "-o", "--output", type=str, metavar="RUNS", help="runs folder (one sub-folder per run)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--launch", action="store_true", help="run the unfinished runs one after another")
    mode.add_argument("--closed-loop", action="store_true", help="only evaluate the finished runs closed loop (the "
                      "spec's closed_loop section; runs with <run>/closed_loop/report.json are skipped)")
    mode.add_argument("--print", dest="print_cmds", action="store_true", help="print one command per unfinished run")
    p.add_argument("--dry-run", action="store_true", help="write and run nothing; show what would happen")
    add_common_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    setup_logging(args)
    try:
        runs, info = plan_sweep(load_spec(args.spec), args.out)
        if not args.dry_run:
            write_sweep(runs, info)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    closed_loop = info.get("closed_loop")
    if args.closed_loop and closed_loop is None:
        print(f"error: {info['spec']}: --closed-loop needs a `closed_loop:` section in the spec", file=sys.stderr)
        return 2
    pending = [r for r in runs if not r.finished]
    done = [r for r in runs if r.finished]
    if args.print_cmds:
        for r in done:
            print(f"# skipped (finished): {r.name}", file=sys.stderr)
        for r in pending:
            print(f"bash {shlex.quote(str(r.launch_script))}")
        if closed_loop is not None:
            print(f"# then, once they are trained, the closed loop: {_closed_loop_command(args)}", file=sys.stderr)
        return 0
    prefix = "[dry-run] " if args.dry_run else ""
    print(f"{prefix}sweep {info['name']}: {len(runs)} run(s) in {info['runs_dir']} "
          f"({len(done)} finished, {len(pending)} to run)", file=sys.stderr)
    print(format_plan(runs), file=sys.stderr)
    launch_all = Path(info["runs_dir"]) / "launch_all.sh"
    if args.closed_loop:
        return evaluate_runs(runs, closed_loop, dry_run=args.dry_run)
    if args.launch:
        for r in done:
            print(f"[sweep] skipped (finished): {r.name}", file=sys.stderr)
        if args.dry_run:
            for r in pending:
                print(f"[dry-run] would run: bash {shlex.quote(str(r.launch_script))}", file=sys.stderr)
            if closed_loop is not None:
                evaluate_runs(runs, closed_loop, dry_run=True)
            return 0
        if not pending:
            print("[sweep] nothing to run: every run is finished", file=sys.stderr)
            rc = 0
        else:
            rc = subprocess.call(["bash", str(launch_all)], env=os.environ.copy())
        if closed_loop is not None:  # the finished runs, also when another run's training failed
            rc = max(rc, evaluate_runs(runs, closed_loop))
        return rc
    if closed_loop is not None:
        print(f"closed loop: {', '.join(b['name'] for b in closed_loop['benchmarks'])} per finished run, after training "
              f"(--launch does both; --launch --dry-run shows the commands)", file=sys.stderr)
    if not args.dry_run:
        print(f"run them: bash {launch_all}   (or --print for one command per run)", file=sys.stderr)
    return 0


def _closed_loop_command(args: argparse.Namespace) -> str:
    return (f"python -m llava_vla_plugin.experiments.sweep {shlex.quote(str(Path(args.spec).resolve()))} "
            f"--out {shlex.quote(str(_abs(args.out)))} --closed-loop")


if __name__ == "__main__":
    sys.exit(main())
