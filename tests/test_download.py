"""data_tools.download against a local fake OXE bucket written with the fixture writer."""

from __future__ import annotations

import errno
import functools
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from data_tools import download as dl  # noqa: E402
from data_tools.download_spec import (  # noqa: E402
    KNOWN_DATASETS,
    MixtureError,
    load_mixture,
    named_mixtures,
    parse_mixture,
)
from llava_vla_plugin.apps.rlds_fixture import write_rlds_dataset  # noqa: E402

SIZE = (16, 16)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gs://gresearch/robotics look-alike: bridge_orig (train 16 episodes / 8 shards, val 8 / 8), kuka (10 / 5)."""
    root = tmp_path_factory.mktemp("bucket")
    write_rlds_dataset(root, "bridge_orig", splits={"train": 16, "val": 8}, steps=(2, 3), shards=8,
                       image_size=SIZE, seed=1)
    write_rlds_dataset(root, "kuka", splits={"train": 10}, steps=2, shards=5, image_size=SIZE, seed=2)
    return root


def _mixture(tmp_path: Path, source_root: str, datasets: list[dict], name: str = "mix") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({"source_root": source_root, "datasets": datasets}))  # JSON is YAML
    return path


def _fingerprint(episode: dict) -> str:
    digest = hashlib.sha256()

    def feed(value: object) -> None:
        if isinstance(value, dict):
            for key in sorted(value):
                feed(value[key])
        elif isinstance(value, list):
            for item in value:
                feed(item)
        else:
            digest.update(np.asarray(value).tobytes())

    feed({**episode, "steps": list(episode["steps"])})
    return digest.hexdigest()


def _episodes(path: Path, split: str = "train") -> list[str]:
    builder = tfds.builder_from_directory(path)
    return [_fingerprint(ep) for ep in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))]


def _source_episodes_by_shard(path: Path, split: str = "train") -> list[list[str]]:
    lengths = tfds.builder_from_directory(path).info.splits[split].shard_lengths
    flat, out, i = _episodes(path, split), [], 0
    for n in lengths:
        out.append(flat[i:i + n])
        i += n
    return out


def _run(tmp_path: Path, mixture: Path, dest: Path, *extra: str) -> int:
    return dl.main(["--mixture", str(mixture), "--dest", str(dest), "--workers", "2", *extra])


def _manifest(dest: Path, name: str, version: str) -> dict:
    return json.loads((dest / name / version / dl.MANIFEST).read_text())


def _kept(dest: Path, name: str, version: str, split: str = "train") -> list[int]:
    return [s["original_index"] for s in _manifest(dest, name, version)["splits"][split]["shards"]]


# ----------------------------------------------------------------------------------------------
# mixture files


def test_shipped_mixtures_load() -> None:
    shipped = named_mixtures()
    assert {"default", "oxe_magic_soup_plus", "oxe_magic_soup", "bridge", "rt1"} <= set(shipped)
    for name in shipped:
        mixture = load_mixture(name)
        assert mixture.datasets and all(0 < d.fraction <= 1 for d in mixture.datasets)
    default = load_mixture("default")
    assert len(default.datasets) == 25
    assert default["kuka"].fraction == 0.07 and default["kuka"].filter_success
    assert default["bridge_orig"].source.startswith("https://rail.eecs.berkeley.edu/datasets/bridge_release/")
    assert default["fractal20220817_data"].source == "gs://gresearch/robotics/fractal20220817_data/0.1.0"
    hydra = default["stanford_hydra_dataset_converted_externally_to_rlds"]
    assert hydra.flip_image_channels and hydra.flip_wrist_image_channels and hydra.fraction == 0.4
    assert default["berkeley_autolab_ur5"].flip_wrist_image_channels
    assert not default["berkeley_autolab_ur5"].flip_image_channels
    plus = load_mixture("oxe_magic_soup_plus")
    assert len(plus.datasets) == 27 and plus["kuka"].weight == pytest.approx(0.8341046294)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "kuka", "fraction": 0}, r"fraction.*\(0, 1\]"),
        ({"name": "kuka", "fraction": 1.5}, r"fraction.*\(0, 1\]"),
        ({"name": "kuka", "fraction": "half"}, "fraction"),
        ({"name": "brige_orig"}, "closest known names: bridge_orig"),
        ({"name": "kuka", "fracton": 0.5}, "did you mean 'fraction'"),
        ({"name": "kuka", "filter_success": "yes"}, "true or false"),
        ({"fraction": 0.5}, "name"),
    ],
)
def test_bad_mixture_entries(entry: dict, message: str) -> None:
    with pytest.raises(MixtureError, match=message):
        parse_mixture({"datasets": [entry]})


def test_mixture_file_errors(tmp_path: Path) -> None:
    with pytest.raises(MixtureError, match="listed twice"):
        parse_mixture({"datasets": ["kuka", "kuka"]})
    with pytest.raises(MixtureError, match="non-empty list"):
        parse_mixture({"datasets": []})
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [kuka\n")
    with pytest.raises(MixtureError, match="not valid YAML"):
        load_mixture(bad)
    with pytest.raises(MixtureError, match="closest shipped mixtures: default"):
        load_mixture("defualt")
    own = parse_mixture({"datasets": [{"name": "my_robot", "version": "1.0.0", "source": "/data/my_robot/1.0.0"}]})
    assert own["my_robot"].source == "/data/my_robot/1.0.0"
    assert KNOWN_DATASETS["language_table"]


def test_fraction_refused_before_fetching(tmp_path: Path, bucket: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dl, "plan_dataset", lambda *a, **k: pytest.fail("planned despite a bad fraction"))
    mix = _mixture(tmp_path, str(bucket), [{"name": "kuka", "fraction": 1.2}])
    assert _run(tmp_path, mix, tmp_path / "dest") == 2
    assert not (tmp_path / "dest").exists()


# ----------------------------------------------------------------------------------------------
# shard choice


def test_choose_shards_seeded_nested() -> None:
    a = dl.choose_shards(100, 0.2, 0, "kuka/train")
    assert a == dl.choose_shards(100, 0.2, 0, "kuka/train") and len(a) == 20 and a == sorted(a)
    assert a != dl.choose_shards(100, 0.2, 1, "kuka/train")
    assert set(a) <= set(dl.choose_shards(100, 0.5, 0, "kuka/train"))
    assert len(dl.choose_shards(10, 0.01, 0, "x")) == 1
    assert len(dl.choose_shards(10, 0.25, 0, "x")) == 2  # round(2.5) == 2
    assert dl.choose_shards(7, 1.0, 3, "x") == list(range(7))


# ----------------------------------------------------------------------------------------------
# downloads


def test_download_reads_exactly_the_chosen_shards(tmp_path: Path, bucket: Path) -> None:
    mix = _mixture(tmp_path, str(bucket), [
        {"name": "bridge_orig", "fraction": 0.5},
        {"name": "kuka", "fraction": 0.4, "filter_success": True},
    ])
    dest = tmp_path / "dest"
    assert _run(tmp_path, mix, dest, "--seed", "7") == 0

    for name, version, tfds_name, total in (("bridge_orig", "1.0.0", "bridge_dataset", 8), ("kuka", "0.1.0", "kuka", 5)):
        src, out = bucket / name / version, dest / name / version
        kept = _kept(dest, name, version)
        assert len(kept) == round(total * (0.5 if name == "bridge_orig" else 0.4))
        by_shard = _source_episodes_by_shard(src)
        assert _episodes(out) == [ep for i in kept for ep in by_shard[i]]
        builder = tfds.builder_from_directory(out)
        assert builder.info.splits["train"].num_shards == len(kept)
        assert (out / dl.ORIG_INFO).read_bytes() == (src / "dataset_info.json").read_bytes()
        assert (out / "features.json").read_bytes() == (src / "features.json").read_bytes()
        manifest = _manifest(dest, name, version)
        assert manifest["complete"] and manifest["seed"] == 7 and manifest["source"] == str(src)
        for new_index, row in enumerate(manifest["splits"]["train"]["shards"]):
            original = src / f"{tfds_name}-train.tfrecord-{row['original_index']:05d}-of-{total:05d}"
            assert row["file"] == f"{tfds_name}-train.tfrecord-{new_index:05d}-of-{len(kept):05d}"
            assert row["sha256"] == hashlib.sha256(original.read_bytes()).hexdigest()
            assert row["size"] == original.stat().st_size == (out / row["file"]).stat().st_size
        # numBytes keeps tfds' meaning: serialized example bytes of the kept shards
        info = json.loads((out / "dataset_info.json").read_text())
        train = next(s for s in info["splits"] if s["name"] == "train")
        files = sum((out / r["file"]).stat().st_size for r in manifest["splits"]["train"]["shards"])
        assert int(train["numBytes"]) == files - 16 * sum(int(n) for n in train["shardLengths"])
        assert manifest["options"]["filter_success"] is (name == "kuka")
    # val of bridge: same fraction by default
    val_kept = _kept(dest, "bridge_orig", "1.0.0", "val")
    by_shard = _source_episodes_by_shard(bucket / "bridge_orig" / "1.0.0", "val")
    assert _episodes(dest / "bridge_orig" / "1.0.0", "val") == [ep for i in val_kept for ep in by_shard[i]]


def test_same_seed_same_shards_other_seed_others(tmp_path: Path, bucket: Path) -> None:
    mix = _mixture(tmp_path, str(bucket), [{"name": "bridge_orig", "fraction": 0.5}])
    for dest, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert _run(tmp_path, mix, tmp_path / dest, "--seed", seed, "--other-splits", "none") == 0
    a, b, c = (_kept(tmp_path / d, "bridge_orig", "1.0.0") for d in "abc")
    assert a == b and a != c
    out = tmp_path / "a" / "bridge_orig" / "1.0.0"
    for f in out.glob("bridge_dataset-train.*"):
        assert f.read_bytes() == (tmp_path / "b" / "bridge_orig" / "1.0.0" / f.name).read_bytes()
    # splits not fetched are gone from dataset_info.json, so tfds does not look for them
    assert list(tfds.builder_from_directory(out).info.splits.keys()) == ["train"]
    assert not list(out.glob("*-val.*"))


def test_other_splits_all_and_file_url(tmp_path: Path, bucket: Path) -> None:
    mix = _mixture(tmp_path, bucket.as_uri(), [{"name": "bridge_orig", "fraction": 0.25}])
    assert _run(tmp_path, mix, tmp_path / "d", "--other-splits", "all") == 0
    builder = tfds.builder_from_directory(tmp_path / "d" / "bridge_orig" / "1.0.0")
    assert builder.info.splits["val"].num_shards == 8 and builder.info.splits["val"].num_examples == 8
    assert builder.info.splits["train"].num_shards == 2


def test_dry_run_fetches_nothing(tmp_path: Path, bucket: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(dl, "fetch_once", lambda *a, **k: pytest.fail("dry run fetched a file"))
    mix = _mixture(tmp_path, str(bucket), [{"name": "bridge_orig", "fraction": 0.5}, {"name": "kuka", "fraction": 0.4}])
    assert _run(tmp_path, mix, tmp_path / "dest", "--dry-run") == 0
    assert not (tmp_path / "dest").exists()
    out = capsys.readouterr().out
    assert "bridge_orig" in out and "4/8" in out and "8/16" in out and "2/5" in out and "4/10" in out
    assert "total: 16 episodes" in out  # bridge 8 train + 4 val + kuka 4


def test_killed_download_resumes_without_refetching(tmp_path: Path, bucket: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fetched: list[str] = []
    real = dl.fetch_once

    def crash_after(k: int):
        def fetch(fs, url, dest, on_bytes):
            if len(fetched) == k:
                dest.write_bytes(b"half a file")  # what a kill leaves behind
                raise KeyboardInterrupt
            fetched.append(url.rsplit("/", 1)[-1])
            return real(fs, url, dest, on_bytes)
        return fetch

    mix = _mixture(tmp_path, str(bucket), [{"name": "bridge_orig", "fraction": 0.5}])
    entry = load_mixture(mix)["bridge_orig"]
    plan = dl.plan_dataset(entry, seed=0, other_splits="none")
    out = tmp_path / "dest" / "bridge_orig" / "1.0.0"
    monkeypatch.setattr(dl, "fetch_once", crash_after(3))
    with pytest.raises(KeyboardInterrupt):
        dl.download_dataset(plan, tmp_path / "dest", workers=1)
    first = list(fetched)
    assert len(first) == 3 and not (out / "dataset_info.json").exists()  # incomplete: tfds cannot read it
    # what a hard kill can leave: a temp file, and a renamed file the manifest never recorded
    done = {r["file"] for r in _manifest(tmp_path / "dest", "bridge_orig", "1.0.0")["splits"]["train"]["shards"]
            if r["sha256"]}
    missing = sorted(t.target for t in plan.tasks if t.split == "train" and t.target not in done)
    (out / f".{missing[0]}.part").write_bytes(b"partial")
    (out / missing[1]).write_bytes(b"truncated")

    fetched.clear()
    monkeypatch.setattr(dl, "fetch_once", crash_after(10**6))
    assert _run(tmp_path, mix, tmp_path / "dest", "--other-splits", "none") == 0
    assert not set(first) & set(fetched)
    assert len(first) + len(fetched) == len(plan.tasks)
    assert not list(out.glob(".*.part"))
    kept = _kept(tmp_path / "dest", "bridge_orig", "1.0.0")
    by_shard = _source_episodes_by_shard(bucket / "bridge_orig" / "1.0.0")
    assert _episodes(out) == [ep for i in kept for ep in by_shard[i]]

    # a complete download is a no-op
    fetched.clear()
    assert _run(tmp_path, mix, tmp_path / "dest", "--other-splits", "none") == 0
    assert fetched == []

    # a larger fraction with the same seed keeps (renames) the shards it has and fetches only the new ones
    bigger = _mixture(tmp_path, str(bucket), [{"name": "bridge_orig", "fraction": 0.75}], name="bigger")
    assert _run(tmp_path, bigger, tmp_path / "dest", "--other-splits", "none") == 0
    now = _kept(tmp_path / "dest", "bridge_orig", "1.0.0")
    assert set(kept) < set(now) and len(now) == 6
    assert sorted(fetched) == sorted(f"bridge_dataset-train.tfrecord-{i:05d}-of-00008" for i in set(now) - set(kept))
    assert _episodes(out) == [ep for i in now for ep in by_shard[i]]
    assert len(list(out.glob("bridge_dataset-train.*"))) == 6


def test_sigkilled_download_resumes(tmp_path: Path, bucket: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real kill (no cleanup runs): the rerun fetches only what the killed run had not finished."""
    script = tmp_path / "slow_download.py"
    script.write_text(
        "import sys, time\n"
        "from data_tools import download as dl\n"
        "real, count = dl.fetch_once, [0]\n"
        "def slow(fs, url, dest, on_bytes):\n"
        "    count[0] += 1\n"
        "    if count[0] > 3:\n"
        "        dest.write_bytes(b'partial')\n"
        "        time.sleep(120)\n"
        "    return real(fs, url, dest, on_bytes)\n"
        "dl.fetch_once = slow\n"
        "sys.exit(dl.main(sys.argv[1:]))\n"
    )
    mix = _mixture(tmp_path, str(bucket), [{"name": "bridge_orig", "fraction": 0.5}])
    dest = tmp_path / "dest"
    args = ["--mixture", str(mix), "--dest", str(dest), "--workers", "1", "--other-splits", "none"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = dest / "bridge_orig" / "1.0.0" / dl.MANIFEST
    done: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(done) < 3:
            time.sleep(0.1)
            if manifest.is_file():
                m = json.loads(manifest.read_text())
                done = [r["source_file"] for r in m["metadata_files"] + m["splits"]["train"]["shards"] if r["sha256"]]
        assert len(done) == 3, "the download did not get going"
    finally:
        proc.kill()
        proc.wait()
    out = dest / "bridge_orig" / "1.0.0"
    assert list(out.glob(".*.part"))  # the kill left its temp file behind

    fetched: list[str] = []
    real = dl.fetch_once

    def counting(fs, url, path, on_bytes):
        fetched.append(url.rsplit("/", 1)[-1])
        return real(fs, url, path, on_bytes)

    monkeypatch.setattr(dl, "fetch_once", counting)
    assert dl.main(args) == 0
    assert not set(done) & set(fetched) and len(done) + len(fetched) == 2 + 4  # 2 metadata files, 4 shards
    assert not list(out.glob(".*.part"))
    kept = _kept(dest, "bridge_orig", "1.0.0")
    by_shard = _source_episodes_by_shard(bucket / "bridge_orig" / "1.0.0")
    assert _episodes(out) == [ep for i in kept for ep in by_shard[i]]


def test_unreachable_source_others_continue(tmp_path: Path, bucket: Path, caplog: pytest.LogCaptureFixture) -> None:
    mix = _mixture(tmp_path, str(bucket), [
        {"name": "kuka", "fraction": 0.4},
        {"name": "bridge_orig", "source": str(tmp_path / "nowhere")},
    ])
    assert _run(tmp_path, mix, tmp_path / "dest") == 1
    assert "bridge_orig" in caplog.text and "cannot list" in caplog.text
    assert _manifest(tmp_path / "dest", "kuka", "0.1.0")["complete"]


def test_size_mismatch_refetched_once_then_error(tmp_path: Path, bucket: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    real, calls = dl.fetch_once, {}

    def short(times: int):
        def fetch(fs, url, dest, on_bytes):
            name = url.rsplit("/", 1)[-1]
            calls[name] = calls.get(name, 0) + 1
            size, sha = real(fs, url, dest, on_bytes)
            if name.startswith("kuka-train") and calls[name] <= times:
                with open(dest, "ab") as f:
                    f.write(b"junk")
                return size + 4, sha
            return size, sha
        return fetch

    mix = _mixture(tmp_path, str(bucket), [{"name": "kuka", "fraction": 0.2}])
    monkeypatch.setattr(dl, "fetch_once", short(1))
    assert _run(tmp_path, mix, tmp_path / "ok") == 0
    assert max(v for k, v in calls.items() if k.startswith("kuka-train")) == 2

    calls.clear()
    monkeypatch.setattr(dl, "fetch_once", short(99))
    assert _run(tmp_path, mix, tmp_path / "bad") == 1
    assert "kuka-train.tfrecord-" in caplog.text and "twice" in caplog.text


def test_transient_errors_are_retried(tmp_path: Path, bucket: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real, failed = dl.fetch_once, set()

    def flaky(fs, url, dest, on_bytes):
        if url not in failed:
            failed.add(url)
            dest.write_bytes(b"partial")
            raise ConnectionError("connection reset")
        return real(fs, url, dest, on_bytes)

    monkeypatch.setattr(dl, "fetch_once", flaky)
    plan = dl.plan_dataset(parse_mixture({"source_root": str(bucket), "datasets": ["kuka"]})["kuka"], 0)
    result = dl.download_dataset(plan, tmp_path, workers=2, backoff=0)
    assert result.ok and result.fetched == len(plan.tasks) and result.episodes == 10


def test_disk_full_removes_temp_keeps_finished(tmp_path: Path, bucket: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real, count = dl.fetch_once, [0]

    def fill_disk(fs, url, dest, on_bytes):
        count[0] += 1
        if count[0] == 4:
            dest.write_bytes(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fs, url, dest, on_bytes)

    monkeypatch.setattr(dl, "fetch_once", fill_disk)
    mix = _mixture(tmp_path, str(bucket), [{"name": "kuka"}, {"name": "bridge_orig"}])
    assert dl.main(["--mixture", str(mix), "--dest", str(tmp_path / "d"), "--workers", "1"]) == 1
    out = tmp_path / "d" / "kuka" / "0.1.0"
    assert not list(out.glob(".*.part"))
    manifest = _manifest(tmp_path / "d", "kuka", "0.1.0")
    finished = [r for r in manifest["metadata_files"] + manifest["splits"]["train"]["shards"] if r["sha256"]]
    assert len(finished) == 3 and all((out / r["file"]).is_file() for r in finished)
    assert not manifest["complete"] and not (tmp_path / "d" / "bridge_orig").exists()


def test_http_source(tmp_path: Path, bucket: Path) -> None:
    pytest.importorskip("aiohttp")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(bucket))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/bridge_orig/1.0.0/"
        mix = _mixture(tmp_path, "unused", [{"name": "bridge_orig", "fraction": 0.25, "source": url}])
        assert _run(tmp_path, mix, tmp_path / "dest", "--other-splits", "none") == 0
    finally:
        server.shutdown()
    kept = _kept(tmp_path / "dest", "bridge_orig", "1.0.0")
    by_shard = _source_episodes_by_shard(bucket / "bridge_orig" / "1.0.0")
    assert _episodes(tmp_path / "dest" / "bridge_orig" / "1.0.0") == [ep for i in kept for ep in by_shard[i]]


def test_cli_help_and_unknown_dataset(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        dl.main(["--help"])
    assert exit_info.value.code == 0
    mix = _mixture(tmp_path, "unused", [{"name": "kukaa"}])
    assert _run(tmp_path, mix, tmp_path / "dest") == 2
    assert "closest known names: kuka" in caplog.text


# ----------------------------------------------------------------------------------------------
# failing fast offline, --timeout, --source-root (issue 10, defect 8)


def _cli(cwd: Path, *args: str, env: dict | None = None, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    """The real command, from a folder outside the repository, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **(env or {})}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "data_tools.download", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def test_unresolvable_source_fails_in_seconds_with_a_clear_message(tmp_path: Path) -> None:
    # .invalid never resolves (RFC 2606): what an offline machine sees for storage.googleapis.com.
    # Before the fix, gcsfs/aiohttp retried each dataset's DNS failure for ~33 s.
    datasets = [{"name": n, "source": f"https://oxe-mirror.invalid/{n}/0.1.0"} for n in ("kuka", "taco_play", "toto")]
    mix = _mixture(tmp_path, "unused", datasets)
    proc, seconds = _cli(tmp_path, "--mixture", str(mix), "--out", "data", "--dry-run")
    assert proc.returncode == 1, proc.stderr
    assert seconds < 20, f"an unreachable source took {seconds:.1f} s to report"
    assert "cannot resolve host oxe-mirror.invalid" in proc.stderr and "--source-root" in proc.stderr
    assert proc.stderr.count("cannot resolve host") == 1  # explained once, then "see above"
    assert all(f"FAILED  {n}" in proc.stdout for n in ("kuka", "taco_play", "toto"))
    assert not (tmp_path / "data").exists()


def test_refused_connection_is_not_retried(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mix = _mixture(tmp_path, "unused", [{"name": "kuka", "source": f"http://127.0.0.1:{port}/kuka/0.1.0/"}])
    start = time.monotonic()
    assert _run(tmp_path, mix, tmp_path / "dest", "--retries", "5") == 1
    assert time.monotonic() - start < 10


def test_timeout_flag_bounds_a_silent_server(tmp_path: Path) -> None:
    """A server that accepts and never answers: --timeout 1 ends the listing in about a second."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        port = server.getsockname()[1]
        mix = _mixture(tmp_path, "unused", [{"name": "kuka", "source": f"http://127.0.0.1:{port}/kuka/0.1.0/"}])
        start = time.monotonic()
        assert dl.main(["--mixture", str(mix), "--out", str(tmp_path / "d"), "--dry-run", "--timeout", "1"]) == 1
        assert time.monotonic() - start < 8
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def test_only_transient_errors_are_retried(tmp_path: Path, bucket: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    import aiohttp

    def response_error(status: int) -> Exception:
        return aiohttp.ClientResponseError(None, (), status=status, message="x")  # type: ignore[arg-type]

    assert dl.is_transient(ConnectionResetError("reset")) and dl.is_transient(TimeoutError())
    assert dl.is_transient(response_error(503)) and dl.is_transient(response_error(429))
    assert not dl.is_transient(response_error(404)) and not dl.is_transient(response_error(403))
    assert not dl.is_transient(socket.gaierror(-2, "Name or service not known"))
    assert not dl.is_transient(FileNotFoundError("gone"))
    wrapped = OSError("listing failed")
    wrapped.__cause__ = OSError(errno.ENETUNREACH, "Network is unreachable")
    assert not dl.is_transient(wrapped)

    calls: list[str] = []

    def missing(fs, url, dest, on_bytes):
        calls.append(url)
        raise FileNotFoundError(url)

    monkeypatch.setattr(dl, "fetch_once", missing)
    mix = _mixture(tmp_path, str(bucket), [{"name": "kuka", "fraction": 0.2}])
    assert dl.main(["--mixture", str(mix), "--out", str(tmp_path / "d"), "--workers", "1", "--retries", "3"]) == 1
    assert len(calls) == 1, "a missing file was retried"
    assert "not retried" in caplog.text


def test_source_root_flag_and_env_read_a_local_copy(tmp_path: Path, bucket: Path) -> None:
    """A shipped preset by name (its sources are on the internet), redirected to a local copy."""
    proc, _ = _cli(tmp_path, "--mixture", "bridge", "--out", "data", "--source-root", str(bucket),
                   "--other-splits", "none", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    manifest = _manifest(tmp_path / "data", "bridge_orig", "1.0.0")
    assert manifest["complete"] and manifest["source"] == f"{bucket}/bridge_orig/1.0.0"
    # the environment variable does the same (the flag wins when both are set)
    proc, _ = _cli(tmp_path, "--mixture", "bridge", "--out", "data2", "--dry-run",
                   env={dl.SOURCE_ROOT_ENV: str(bucket)})
    assert proc.returncode == 0, proc.stderr
    assert "bridge_orig" in proc.stdout and "16/16" in proc.stdout  # the preset fetches every shard
    proc, _ = _cli(tmp_path, "--mixture", "bridge", "--out", "data3", "--dry-run", "--source-root", str(bucket),
                   env={dl.SOURCE_ROOT_ENV: str(tmp_path / "nowhere")})
    assert proc.returncode == 0, proc.stderr
