"""One flag convention across the command-line tools (data_tools/cli.py), old spellings kept as aliases.

Parsing is compared, not just accepted: an alias that parsed into another attribute would pass
`--help` and still be ignored by main(). The tools' own tests run the old spellings for real
(test_download: --dest, test_eval: --report, test_sweep: -o, test_mixture_tool: --converted/-o,
test_scaling: --report); tests/test_readme_flow.py runs the new ones as the README writes them.
"""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env

TOOLS = [
    "data_tools.download", "data_tools.convert", "data_tools.validate", "data_tools.stats", "data_tools.mixture",
    "llava_vla_plugin.infer.eval", "llava_vla_plugin.experiments.sweep", "llava_vla_plugin.experiments.scaling",
    "llava_vla_plugin.experiments.mixture_compare",
]

# (tool, old spelling, new spelling): both must parse to the same arguments
ALIASES = [
    ("data_tools.download", ["--mixture", "default", "--dest", "data"], ["--mixture", "default", "--out", "data"]),
    ("data_tools.validate", ["converted"], ["--data-dir", "converted"]),
    ("data_tools.stats", ["converted", "--plot", "plots"], ["--data-dir", "converted", "--out", "plots"]),
    ("data_tools.mixture", ["--converted", "c", "--preset", "rtx", "-o", "m.yaml"],
     ["--data-dir", "c", "--preset", "rtx", "--out", "m.yaml"]),
    ("data_tools.mixture", ["--converted", "c", "--preset", "rtx", "--output", "m.yaml"],
     ["--data-dir", "c", "--preset", "rtx", "--out", "m.yaml"]),
    ("llava_vla_plugin.infer.eval", ["--checkpoint", "ck", "--data", "v.jsonl", "--image-folder", "c", "--report", "r"],
     ["--checkpoint", "ck", "--data", "v.jsonl", "--image-folder", "c", "--out", "r"]),
    ("llava_vla_plugin.experiments.sweep", ["spec.yaml", "-o", "runs"], ["spec.yaml", "--out", "runs"]),
    ("llava_vla_plugin.experiments.sweep", ["spec.yaml", "--output", "runs"], ["spec.yaml", "--out", "runs"]),
    ("llava_vla_plugin.experiments.scaling", ["runs", "--report", "rep"], ["runs", "--out", "rep"]),
]


def _parser(tool: str):
    return importlib.import_module(tool).build_parser()


def _parsed(parser, argv: list[str]) -> dict:
    """What main() sees: for tools with an input folder, after resolve_input merged the two spellings."""
    from data_tools.cli import resolve_input

    args = parser.parse_args(argv)
    if hasattr(args, "data_dir_opt"):
        resolve_input(parser, args)
        del args.data_dir_opt
    return vars(args)


@pytest.mark.parametrize("tool,old,new", ALIASES, ids=[f"{t}:{' '.join(o)}" for t, o, _ in ALIASES])
def test_old_and_new_spellings_parse_the_same(tool: str, old: list[str], new: list[str]) -> None:
    parser = _parser(tool)
    assert _parsed(parser, old) == _parsed(parser, new)


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_has_the_common_flags(tool: str) -> None:
    parser = _parser(tool)
    options = {s for a in parser._actions for s in a.option_strings}
    assert {"--no-progress", "-v", "--verbose", "-h", "--help"} <= options, tool
    # the output flag is --out wherever a tool writes somewhere
    if tool != "data_tools.validate":
        assert "--out" in options, tool


def test_input_given_twice_differently_is_a_usage_error(tmp_path) -> None:
    from data_tools import validate

    with pytest.raises(SystemExit) as exit_info:
        validate.main(["a", "--data-dir", "b"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        validate.main([])
    assert exit_info.value.code == 2


def test_help_from_outside_the_repo(tmp_path) -> None:
    """`python -m TOOL --help` works from any folder and exits 0 (the README's commands rely on it)."""
    for tool in TOOLS:
        proc = subprocess.run([sys.executable, "-m", tool, "--help"], cwd=tmp_path, env=subprocess_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{tool}: {proc.stderr[-2000:]}"
        assert "--out" in proc.stdout or tool == "data_tools.validate", tool
    assert not (tmp_path / "data").exists() and ROOT.is_dir()
