"""Shared fixtures: upstream and shared-schema detection (tests that need them skip with the reason, and
fail instead under CI=true: CI has both beside the clone, so a missing one is a broken CI, not an optional
extra), the tiny model."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_REASON = ("upstream LLaVA-NeXT is not installed: run `LLAVA_NEXT_SRC=/path/to/LLaVA-NeXT make setup` "
                   "(a local checkout or git mirror at commit df17966) to run this test")


# .ci/run exports CI=true (as GitHub Actions and most CI services do)
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
SHARED_SCHEMAS = ROOT.parent / "shared" / "oxe_schemas"


def upstream_available() -> bool:
    return importlib.util.find_spec("llava") is not None


# under CI the test runs (and fails on the missing import) instead of skipping
requires_upstream = pytest.mark.skipif(not upstream_available() and not IN_CI, reason=UPSTREAM_REASON)


def skip_unless_ci(reason: str) -> None:
    """pytest.skip(reason) on a workstation; pytest.fail(reason) under CI=true, where nothing may be skipped."""
    if IN_CI:
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def shared_schemas_missing(what: str) -> None:
    """Skip (fail under CI) a test that needs the shared OXE schemas ($OXE_SCHEMAS_DIR or ../shared/oxe_schemas)."""
    skip_unless_ci(f"{what} needs the shared OXE schemas, not found at $OXE_SCHEMAS_DIR or {SHARED_SCHEMAS}")


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "USE_TF": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLA_PYTHON": sys.executable,
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(extra or {})
    return env


def run_py(args: list[str], env: dict[str, str] | None = None, timeout: int = 900, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], env=env or subprocess_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT)
    return proc


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from llava_vla_plugin.apps.tiny_model import build_qwen2_tokenizer

    return build_qwen2_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tiny llava_qwen model, built once per test session (needs upstream)."""
    if not upstream_available():
        skip_unless_ci(UPSTREAM_REASON)
    from llava_vla_plugin.apps.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))
