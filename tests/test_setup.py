"""`make setup` behaviour that can be checked without reinstalling: missing upstream, bad patches,
idempotence, and the patches' own contract (header, apply cleanly to the pinned commit)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, upstream_available

PINNED = "df179663ae8b83207df100a1f7af24caec633ff9"
VENV = Path(sys.prefix)


def _project_copy(tmp_path: Path) -> Path:
    """The files setup.sh reads, in a scratch folder, reusing this environment's venv (no installs)."""
    dst = tmp_path / "proj"
    dst.mkdir()
    for name in ["scripts", "patches"]:
        shutil.copytree(ROOT / name, dst / name)
    for name in ["constraints.txt", "pyproject.toml", "Makefile"]:
        shutil.copy(ROOT / name, dst / name)
    return dst


def _setup(proj: Path, **env) -> subprocess.CompletedProcess:
    stamp = f".vla-deps-{_deps_hash(proj)}"
    if not (VENV / stamp).exists():
        pytest.skip(f"this environment was not made by make setup (no {stamp} in {VENV})")
    full = {**os.environ, "VENV": str(VENV), **env}
    return subprocess.run(["bash", str(proj / "scripts/setup.sh")], cwd=proj, env=full, capture_output=True, text=True, timeout=600)


def _deps_hash(proj: Path) -> str:
    out = subprocess.run("cat constraints.txt pyproject.toml | sha256sum | cut -c1-16", shell=True, cwd=proj,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_patches_have_headers():
    patches = sorted((ROOT / "patches").glob("*.patch"))
    assert len(patches) >= 5
    for p in patches:
        head = p.read_text().split("diff --git", 1)[0]
        for key in ("Upstream file:", "What:", "Why:"):
            assert key in head, f"{p.name} lacks '{key}'"


def test_without_upstream_setup_explains_and_exits_0(tmp_path):
    proj = _project_copy(tmp_path)
    # REQUIRE_UPSTREAM=0 explicitly: .ci/run exports REQUIRE_UPSTREAM=1 for its own setup
    proc = _setup(proj, LLAVA_NEXT_SRC=str(tmp_path / "no-such-checkout"), REQUIRE_UPSTREAM="0")
    assert proc.returncode == 0, proc.stderr
    assert "LLAVA_NEXT_SRC=/opt/LLaVA-NeXT make setup" in proc.stdout
    assert "data tools" in proc.stdout
    strict = _setup(proj, LLAVA_NEXT_SRC=str(tmp_path / "no-such-checkout"), REQUIRE_UPSTREAM="1")
    assert strict.returncode != 0 and "REQUIRE_UPSTREAM=1" in strict.stderr


def _upstream_src() -> str | None:
    """A git copy of upstream that plain `git clone` accepts: make setup's own checkout first (LLAVA_NEXT_SRC may
    be a read-only bare mirror without refs/, which only setup.sh knows how to clone)."""
    candidate = ROOT / ".upstream/LLaVA-NeXT"
    if (candidate / ".git").exists():
        return str(candidate)
    src = os.environ.get("LLAVA_NEXT_SRC")
    return src if src and Path(src).exists() else None


def test_patch_that_does_not_apply_is_named(tmp_path):
    src = _upstream_src()
    if not src:
        pytest.skip("needs a local upstream git copy: set LLAVA_NEXT_SRC or run make setup with it")
    proj = _project_copy(tmp_path)
    (proj / "patches/0099-broken.patch").write_text(
        "Upstream file: x\nWhat: x\nWhy: x\n\ndiff --git a/README.md b/README.md\n--- a/README.md\n+++ b/README.md\n"
        "@@ -1,1 +1,1 @@\n-this line is not in upstream\n+replacement\n")
    proc = _setup(proj, LLAVA_NEXT_SRC=src)
    assert proc.returncode != 0
    assert "0099-broken.patch" in proc.stderr and "df17966" in proc.stderr and "What to do" in proc.stderr


def test_patches_apply_to_pinned_commit(tmp_path):
    src = _upstream_src()
    if not src:
        pytest.skip("needs a local upstream git copy: set LLAVA_NEXT_SRC or run make setup with it")
    work = tmp_path / "up"
    subprocess.run(["git", "clone", "-q", "--no-checkout", src, str(work)], check=True)
    subprocess.run(["git", "-C", str(work), "checkout", "-q", PINNED], check=True)
    for p in sorted((ROOT / "patches").glob("*.patch")):
        r = subprocess.run(["git", "-C", str(work), "apply", "--check", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, f"{p.name}: {r.stderr}"
        subprocess.run(["git", "-C", str(work), "apply", str(p)], check=True)


@pytest.mark.skipif(not upstream_available(), reason="upstream not installed: idempotence is checked after a full make setup")
def test_second_setup_is_a_noop():
    if not (ROOT / ".upstream").exists():
        pytest.skip("upstream installed by other means than make setup")
    proc = subprocess.run(["bash", str(ROOT / "scripts/setup.sh")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "VENV": str(VENV)})
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stdout
