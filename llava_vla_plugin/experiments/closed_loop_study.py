"""The closed-loop step of a study: every finished run of a sweep, served and run through vla-eval, one
<run>/closed_loop/report.json each (issue 24 item 4).

A sweep spec (experiments/sweep.py) with a `closed_loop:` section gets this step after training
(`sweep SPEC --out RUNS --launch`, or only this step: `--closed-loop`; `mixture_compare RUNS --spec SPEC --launch`
adds the report)::

    closed_loop:
      benchmarks:                      # vla-eval run configs: a file, or the name of a shipped one (configs/vla_eval/NAME.yaml)
        - lift                         # robosuite Lift on CPU (MUJOCO_GL=egl)
        - config: configs/vla_eval/simpler_widowx.yaml     # a mapping sets anything below for one benchmark
          unnorm_key: bridge_orig
          server_args: [--image-key, primary, --gripper, raw, --rotation, euler_to_axisangle]
      episodes: 50                     # optional: episodes per task (default: each config's episodes_per_task)
      max_steps: 220                   # optional: the step limit per episode (default: the config's / the benchmark's)
      params: {seed: 7}                # optional: vla-eval --param KEY=VALUE for every benchmark
      unnorm_key: libero_spatial       # optional with one dataset per run (then the checkpoint's only statistics)
      server_args: [--center-crop]     # optional: more vla_eval_server options
      vla_eval_args: []                # optional: more `vla-eval run` options
      docker: false                    # default false: `vla-eval run --no-docker` (the benchmark in this environment)
      env: {MUJOCO_GL: egl}            # optional: environment of the server and vla-eval (MUJOCO_GL defaults to egl)
      inputs: "..."                    # optional: what the policy saw, for the report (closed_loop_report --inputs)
      timeout: 7200                    # optional: seconds one benchmark may run

Every benchmark's `name` must be a suite of configs/closed_loop/published.yaml (the report's rows are suites).

For every run with out/final_metrics.json and no <run>/closed_loop/report.json: per benchmark, the run's out/
checkpoint is served on a free 127.0.0.1 port (infer/vla_eval_run.py, shared with `make eval-demo`), vla-eval
writes into closed_loop/results/.<name>.partial/, renamed to closed_loop/results/<name>/ when it exits cleanly;
then closed_loop_report's code writes closed_loop/report.md and report.json (atomically; report.json last).
Resumable: a run with report.json is skipped, a finished benchmark is not re-run, a killed one starts over, and no
half report is ever left. The settings each run was evaluated with are kept in closed_loop/settings.json; a
changed `closed_loop:` section is refused for a run that has started its evaluation (delete <run>/closed_loop).
"""
from __future__ import annotations

import itertools
import json
import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

from llava_vla_plugin.experiments.closed_loop_report import (DEFAULT_INPUTS, PUBLISHED, REPORT_DIR, checkpoint_actions,
                                                             collect, load_published, render, suite_of, wilson_interval,
                                                             write_report)
from llava_vla_plugin.infer.vla_eval_run import (ClosedLoopRunError, checkpoint_server_args, run_logged, server_command,
                                                 serving, vla_eval_command)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONFIGS = ROOT / "configs" / "vla_eval"
KEYS = ("benchmarks", "episodes", "max_steps", "params", "unnorm_key", "server_args", "vla_eval_args", "docker", "env",
        "inputs", "timeout")
ENTRY_KEYS = ("config", "name", "episodes", "max_steps", "params", "unnorm_key", "server_args", "vla_eval_args")
SETTINGS = "settings.json"
PREFIX = "[closed-loop]"

__all__ = ["ClosedLoopSpecError", "parse_closed_loop", "check_runs", "evaluate_runs", "describe"]


class ClosedLoopSpecError(ValueError):
    """A `closed_loop:` section that cannot run; the message names the key (the sweep adds the file)."""


class RunLike(Protocol):  # experiments.sweep.Run (not imported: the sweep imports this module)
    name: str
    dir: Path
    config: dict[str, Any]
    env: dict[str, str]

    @property
    def out_dir(self) -> Path: ...

    @property
    def finished(self) -> bool: ...


# ----------------------------------------------------------------------------------------------
# The section


def _positive_int(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ClosedLoopSpecError(f"{where} must be a positive integer, got {value!r}")
    return value


def _str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        raise ClosedLoopSpecError(f"{where} must be a list of strings, e.g. [--center-crop], got {value!r}")
    return [str(v) for v in value]


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ClosedLoopSpecError(f"{where} must be a mapping, got {value!r}")
    return {str(k): v for k, v in value.items()}


def _shipped() -> list[str]:
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def _config_path(value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ClosedLoopSpecError(f"{where}: expected a vla-eval config file or a shipped config's name, got {value!r}")
    p = Path(value).expanduser()
    if p.is_file():
        return p.resolve()
    if "/" not in value and (SHIPPED_CONFIGS / f"{value}.yaml").is_file():
        return SHIPPED_CONFIGS / f"{value}.yaml"
    raise ClosedLoopSpecError(f"{where}: no file {value} (relative paths resolve against the current directory) and no "
                              f"shipped config of that name; shipped: {', '.join(_shipped())}")


def _benchmark_names(config: Path, where: str) -> list[str]:
    """The benchmark names of a vla-eval run config, read as vla-eval reads it (its `extends` included)."""
    try:
        from vla_eval.cli.config_loader import load_config
    except ImportError:  # vla-eval missing: read the file itself; the run would fail later anyway
        import yaml

        def load_config(path: str) -> dict[str, Any]:
            return yaml.safe_load(Path(path).read_text()) or {}
    try:
        doc = load_config(str(config))
    except Exception as e:  # noqa: BLE001 - any unreadable config is a spec error, said in one line
        raise ClosedLoopSpecError(f"{where}: {config} is not a readable vla-eval config ({type(e).__name__}: {e})") from None
    benches = doc.get("benchmarks") if isinstance(doc, Mapping) else None
    if not isinstance(benches, list) or not benches or not all(isinstance(b, Mapping) for b in benches):
        raise ClosedLoopSpecError(f"{where}: {config} has no `benchmarks:` list (is it a vla-eval run config?)")
    return [str(b.get("name") or b.get("benchmark")) for b in benches]


def parse_closed_loop(raw: Any, published: Path = PUBLISHED) -> dict[str, Any] | None:
    """The checked `closed_loop:` section (None when absent), JSON-ready: what sweep.json records."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ClosedLoopSpecError("closed_loop must be a mapping with `benchmarks:` (see "
                                  "llava_vla_plugin/experiments/closed_loop_study.py)")
    unknown = sorted(set(map(str, raw)) - set(KEYS))
    if unknown:
        raise ClosedLoopSpecError(f"closed_loop: unknown key(s) {unknown}; allowed: {', '.join(KEYS)}")
    entries = raw.get("benchmarks")
    if isinstance(entries, (str, Mapping)):
        entries = [entries]
    if not isinstance(entries, list) or not entries:
        raise ClosedLoopSpecError(f"closed_loop.benchmarks: give one or more vla-eval configs (shipped: {', '.join(_shipped())})")
    defaults = {
        "episodes": _positive_int(raw.get("episodes"), "closed_loop.episodes"),
        "max_steps": _positive_int(raw.get("max_steps"), "closed_loop.max_steps"),
        "params": _mapping(raw.get("params"), "closed_loop.params"),
        "unnorm_key": None if raw.get("unnorm_key") is None else str(raw["unnorm_key"]),
        "server_args": _str_list(raw.get("server_args"), "closed_loop.server_args"),
        "vla_eval_args": _str_list(raw.get("vla_eval_args"), "closed_loop.vla_eval_args"),
    }
    bad = [a for a in defaults["server_args"] if a in ("--checkpoint", "--port", "--host")]
    if bad:
        raise ClosedLoopSpecError(f"closed_loop.server_args may not set {bad}: the step sets the run's checkpoint and a "
                                  "free loopback port")
    docker = raw.get("docker", False)
    if not isinstance(docker, bool):
        raise ClosedLoopSpecError(f"closed_loop.docker must be true or false, got {docker!r}")
    timeout = raw.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ClosedLoopSpecError(f"closed_loop.timeout must be a number of seconds > 0, got {timeout!r}")
    env = _mapping(raw.get("env"), "closed_loop.env")
    suites = list(load_published(published)["suites"])
    benchmarks = []
    for i, item in enumerate(entries):
        where = f"closed_loop.benchmarks[{i}]"
        if isinstance(item, str):
            item = {"config": item}
        if not isinstance(item, Mapping) or "config" not in item:
            raise ClosedLoopSpecError(f"{where}: expected a config (file or shipped name) or a mapping with `config`, "
                                      f"got {item!r}")
        unknown = sorted(set(map(str, item)) - set(ENTRY_KEYS))
        if unknown:
            raise ClosedLoopSpecError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(ENTRY_KEYS)}")
        config = _config_path(item["config"], f"{where}.config")
        names = _benchmark_names(config, f"{where}.config")
        nomatch = [n for n in names if suite_of(n, suites) is None]
        if nomatch:
            raise ClosedLoopSpecError(f"{where}.config: {config}: benchmark name(s) {nomatch} match no suite of {published} "
                                      f"({', '.join(suites)}); the report would have no row for them: add the suite there")
        bench = {
            "name": str(item.get("name") or config.stem), "config": str(config), "benchmark_names": names,
            "episodes": _positive_int(item.get("episodes"), f"{where}.episodes") if "episodes" in item else defaults["episodes"],
            "max_steps": (_positive_int(item.get("max_steps"), f"{where}.max_steps") if "max_steps" in item
                          else defaults["max_steps"]),
            "params": {**defaults["params"], **_mapping(item.get("params"), f"{where}.params")},
            "unnorm_key": str(item["unnorm_key"]) if item.get("unnorm_key") is not None else defaults["unnorm_key"],
            "server_args": defaults["server_args"] + _str_list(item.get("server_args"), f"{where}.server_args"),
            "vla_eval_args": defaults["vla_eval_args"] + _str_list(item.get("vla_eval_args"), f"{where}.vla_eval_args"),
        }
        if not bench["name"].replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ClosedLoopSpecError(f"{where}.name: {bench['name']!r}: letters, digits, '.', '_' and '-' only (a folder name)")
        bad = [a for a in bench["server_args"] if a in ("--checkpoint", "--port", "--host")]
        if bad:
            raise ClosedLoopSpecError(f"{where}.server_args may not set {bad}: the step sets the run's checkpoint and a "
                                      "free loopback port")
        benchmarks.append(bench)
    labels = [b["name"] for b in benchmarks]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ClosedLoopSpecError(f"closed_loop.benchmarks: {dup} twice; give the entries distinct `name:`s")
    return {"benchmarks": benchmarks, "docker": docker, "env": {k: str(v) for k, v in env.items()},
            "inputs": str(raw.get("inputs") or DEFAULT_INPUTS), "timeout": timeout, "published": str(published)}


def check_runs(cl: Mapping[str, Any], runs: Sequence[RunLike]) -> None:
    """Every run can be served for every benchmark: without an unnorm_key the checkpoint must hold one dataset."""
    for run in runs:
        datasets = sorted(run.config.get("mixture_shares") or {})
        for i, b in enumerate(cl["benchmarks"]):
            if b["unnorm_key"] is None and len(datasets) > 1:
                raise ClosedLoopSpecError(f"closed_loop.benchmarks[{i}] ({b['name']}): run {run.name} trains on "
                                          f"{len(datasets)} datasets ({', '.join(datasets)}): set closed_loop.unnorm_key "
                                          "(or the benchmark's), the dataset whose statistics un-normalize its actions")


# ----------------------------------------------------------------------------------------------
# The step


def _server_args(run: RunLike, bench: Mapping[str, Any]) -> list[str]:
    return checkpoint_server_args(run.out_dir, bench["unnorm_key"], bench["server_args"])


def _eval_cmd(bench: Mapping[str, Any], port: int | str, out: Path, cl: Mapping[str, Any]) -> list[str]:
    return vla_eval_command(bench["config"], port, out, episodes=bench["episodes"], max_steps=bench["max_steps"],
                            params=bench["params"], docker=cl["docker"], extra=bench["vla_eval_args"])


def _settings(run: RunLike, cl: Mapping[str, Any]) -> dict[str, Any]:
    """What a run's report depends on (the checkpoint, each benchmark's settings); recorded in settings.json."""
    return {"checkpoint": str(run.out_dir), "docker": cl["docker"], "inputs": cl["inputs"],
            "benchmarks": [{k: b[k] for k in ("name", "config", "episodes", "max_steps", "params", "unnorm_key",
                                              "server_args", "vla_eval_args")} for b in cl["benchmarks"]]}


def _changed(run: RunLike, cl: Mapping[str, Any]) -> str | None:
    path = run.dir / REPORT_DIR / SETTINGS
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except ValueError:
        return None
    new = json.loads(json.dumps(_settings(run, cl)))
    if old == new:
        return None
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return (f"run {run.name} was evaluated closed loop with other settings (differs in: {', '.join(diff)}; "
            f"{path}); delete {run.dir / REPORT_DIR} to evaluate it again with these")


def _env(run: RunLike, cl: Mapping[str, Any], base: Mapping[str, str] | None) -> dict[str, str]:
    env = {**(os.environ if base is None else base), **run.env, **cl["env"]}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("MUJOCO_GL", "egl")  # MuJoCo simulators render offscreen through EGL (sim_lift's note)
    return env


def describe(runs: Sequence[RunLike], cl: Mapping[str, Any], out: TextIO = sys.stderr) -> None:
    """--dry-run: what the step would run, per run, with PORT for the free port it picks at run time."""
    q = shlex.join
    print(f"[dry-run] {PREFIX} {len(cl['benchmarks'])} benchmark(s) per run: "
          + ", ".join(f"{b['name']} ({b['config']})" for b in cl["benchmarks"])
          + "; PORT: a free 127.0.0.1 port picked at run time", file=out)
    for run in runs:
        d = run.dir / REPORT_DIR
        problem = _changed(run, cl)
        if problem:
            print(f"[dry-run] {PREFIX} would refuse: {problem}", file=out)
            continue
        if (d / "report.json").is_file():
            print(f"[dry-run] {PREFIX} skipped (report exists): {run.name}", file=out)
            continue
        when = "" if run.finished else " (after its training)"
        print(f"[dry-run] {PREFIX} {run.name}{when}:", file=out)
        for b in cl["benchmarks"]:
            if (d / "results" / b["name"]).is_dir():
                print(f"[dry-run]   kept (done before): {b['name']} -> {d / 'results' / b['name']}", file=out)
                continue
            print(f"[dry-run]   would serve: {q(server_command(_server_args(run, b), 'PORT'))}", file=out)
            print(f"[dry-run]   would run:   {q(_eval_cmd(b, 'PORT', d / 'results' / b['name'], cl))}", file=out)
        print(f"[dry-run]   would write: {d / 'report.json'} (and report.md)", file=out)


def _summary(report: Mapping[str, Any]) -> str:
    parts = []
    for s, r in (report.get("suites") or {}).items():
        lo, hi = wilson_interval(r["successes"], r["trials"])
        parts.append(f"{s} {r['successes']}/{r['trials']} (Wilson 95 % {100 * lo:.1f}-{100 * hi:.1f} %)")
    return "; ".join(parts)


def _evaluate_run(run: RunLike, cl: Mapping[str, Any], published: dict[str, Any], base_env: Mapping[str, str] | None,
                  out: TextIO) -> None:
    from data_tools.atomic import write_text_if_changed

    d = run.dir / REPORT_DIR
    results = d / "results"
    results.mkdir(parents=True, exist_ok=True)
    write_text_if_changed(d / SETTINGS, json.dumps(_settings(run, cl), indent=2, sort_keys=True) + "\n")
    env = _env(run, cl, base_env)
    todo = [b for b in cl["benchmarks"] if not (results / b["name"]).is_dir()]
    for b in cl["benchmarks"]:
        if b not in todo:
            print(f"{PREFIX} {run.name}: {b['name']} kept (done before)", file=out, flush=True)
    # one server for consecutive benchmarks that serve the checkpoint the same way
    for args, group in itertools.groupby(todo, key=lambda b: tuple(_server_args(run, b))):
        group = list(group)
        log = d / f"server_{group[0]['name']}.log"
        print(f"{PREFIX} {run.name}: serving {run.out_dir} (log {log})", file=out, flush=True)
        with serving(list(args), env, log) as port:
            for b in group:
                final, partial = results / b["name"], results / f".{b['name']}.partial"
                if partial.exists():  # a killed evaluation: start it over
                    shutil.rmtree(partial)
                eval_log = d / f"vla_eval_{b['name']}.log"
                print(f"{PREFIX} {run.name}: {b['name']} on 127.0.0.1:{port} ({b['config']}; log {eval_log})",
                      file=out, flush=True)
                run_logged(_eval_cmd(b, port, partial, cl), env, eval_log, cl["timeout"])
                os.replace(partial, final)
    found, unmatched = collect([results / b["name"] for b in cl["benchmarks"]], published["suites"])
    for u in unmatched:
        print(f"{PREFIX} {run.name}: warning: {u} matches no suite of {cl['published']}; not in the report", file=out)
    if not found:
        raise ClosedLoopRunError(f"{run.name}: no vla-eval result matched a suite of {cl['published']}")
    try:
        actions = checkpoint_actions(run.out_dir)
    except Exception as e:  # noqa: BLE001 - the report still stands without it; say why
        actions = f"not read from the checkpoint ({type(e).__name__})"
    md, report = render(found, published, run.name, run.config.get("train_seed"), cl["inputs"], actions)
    write_report(d, md, report)
    print(f"{PREFIX} {run.name}: {_summary(report)} -> {d / 'report.json'}", file=out, flush=True)


def evaluate_runs(runs: Sequence[RunLike], cl: Mapping[str, Any], *, dry_run: bool = False,
                  base_env: Mapping[str, str] | None = None, out: TextIO = sys.stderr) -> int:
    """The step over a sweep's runs. 0: every finished run has its report; 1: a run's evaluation failed (the
    others still ran); 2: refused (a run evaluated with other settings). Unfinished runs are left for later."""
    if dry_run:
        describe(runs, cl, out)
        return 0
    problems = [p for p in (_changed(r, cl) for r in runs) if p]
    if problems:
        for p in problems:
            print(f"error: {p}", file=out)
        return 2
    published = load_published(Path(cl["published"]))
    done = skipped = waiting = 0
    failed: list[str] = []
    for run in runs:
        if (run.dir / REPORT_DIR / "report.json").is_file():
            print(f"{PREFIX} skipped (report exists): {run.name}", file=out)
            skipped += 1
            continue
        if not run.finished:
            print(f"{PREFIX} not trained yet (no out/final_metrics.json), left for later: {run.name}", file=out)
            waiting += 1
            continue
        try:
            _evaluate_run(run, cl, published, base_env, out)
            done += 1
        except (ClosedLoopRunError, OSError, ValueError) as e:
            print(f"{PREFIX} FAILED: {run.name}: {e}", file=out, flush=True)
            failed.append(run.name)
    print(f"{PREFIX} evaluated {done}, skipped {skipped}, not trained {waiting}, failed {len(failed)}"
          + (f": {' '.join(failed)}" if failed else ""), file=out)
    return 1 if failed else 0



# ----------------------------------------------------------------------------------------------
# One checkpoint: the four-suite table in one command


class CheckpointRun:
    """A lone checkpoint as the step's run: served as it is, its report in CHECKPOINT/closed_loop (where
    `scaling --y closed_loop_success` and the mixture comparison look)."""

    def __init__(self, checkpoint: str | os.PathLike):
        self.dir = Path(checkpoint).resolve()
        self.name = self.dir.name
        self.env: dict[str, str] = {}
        stats, seed = self.dir / "dataset_statistics.json", None
        run_config = self.dir / "vla_run_config.json"
        if run_config.is_file():
            seed = json.loads(run_config.read_text()).get("seed")
        self.config = {"mixture_shares": {k: 1.0 for k in json.loads(stats.read_text())} if stats.is_file() else {},
                       "train_seed": seed}

    @property
    def out_dir(self) -> Path:
        return self.dir

    @property
    def finished(self) -> bool:
        return (self.dir / "config.json").is_file()


def build_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m llava_vla_plugin.experiments.closed_loop_study",
        description="Closed-loop evaluation of one checkpoint on every benchmark of a `closed_loop:` section (each "
                    "served with its own --unnorm-key in turn), then the report with Wilson intervals beside the "
                    "published numbers, in CHECKPOINT/closed_loop. Resumable: finished benchmarks are kept.")
    p.add_argument("--checkpoint", required=True, help="the checkpoint directory (OUTPUT_DIR, checkpoint-N or merged)")
    p.add_argument("--spec", required=True, help="YAML holding a `closed_loop:` section (e.g. configs/closed_loop/"
                   "libero_4_suites.yaml), or the section itself")
    p.add_argument("--dry-run", action="store_true", help="print the servers and vla-eval commands; run nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    import yaml

    args = build_parser().parse_args(argv)
    run = CheckpointRun(args.checkpoint)
    if not run.finished:
        print(f"error: --checkpoint {args.checkpoint}: not a checkpoint directory (no config.json)", file=sys.stderr)
        return 2
    try:
        raw = yaml.safe_load(Path(args.spec).read_text())
        section = raw.get("closed_loop", raw) if isinstance(raw, Mapping) else raw
        cl = parse_closed_loop(section)
        check_runs(cl, [run])
    except (OSError, yaml.YAMLError, ClosedLoopSpecError) as e:
        print(f"error: --spec {args.spec}: {e}", file=sys.stderr)
        return 2
    return evaluate_runs([run], cl, dry_run=args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
