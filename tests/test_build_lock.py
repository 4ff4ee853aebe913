"""Issue 26 item 5: an interrupted JIT build of DeepSpeed's optimizer op must not make later runs hang.

Real paths only: DeepSpeed's own op builder (torch's cpp_extension JIT and its FileBaton) builds into a
private TORCH_EXTENSIONS_DIR; the builder's whole process group is killed with SIGKILL once torch's `lock`
exists (as a launcher, `timeout` or a preempted node would); the next run is the train entry itself.
Every process has a timeout, so a regression fails instead of hanging. The build is never finished here
(366 s on a busy 2-core host), only interrupted within seconds."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, requires_upstream, subprocess_env
from llava_vla_plugin.train.build_lock import predicted_op_builders, read_ds_config

START_TIMEOUT_S = 120  # the builder's imports + torch's lock: 5-10 s on a busy 2-core host
DETECT_TIMEOUT_S = 120  # the next run's imports + the check (the check itself takes milliseconds)

# What DeepSpeed's FusedAdam.__init__ does (deepspeed/ops/adam/fused_adam.py: FusedAdamBuilder().load()),
# on whichever accelerator this host has: a DeepSpeed run from before this fix, or outside the plugin.
DEEPSPEED_BUILD = ("from deepspeed.accelerator import get_accelerator\n"
                   "get_accelerator().create_op_builder('FusedAdamBuilder').load()\n")
# The plugin's own pre-build, as train.py runs it in every rank.
PLUGIN_BUILD = ("import logging; logging.basicConfig(level=logging.WARNING)\n"
                "from llava_vla_plugin.train.build_lock import main_check\n"
                "main_check(['--deepspeed', 'configs/zero2.json'])\n")


def _env(ext_dir):
    return subprocess_env({"TORCH_EXTENSIONS_DIR": str(ext_dir), "MAX_JOBS": "1"})


def _op_folder(ext_dir):
    """With TORCH_EXTENSIONS_DIR set the folder is `<dir>/<op>` (torch/utils/cpp_extension.py:2800-2821); the op's
    name is `fused_adam` for DeepSpeed's CPU and CUDA builders alike."""
    return str(ext_dir / "fused_adam")


def _start(code, ext_dir, log):
    """stdout and stderr go to `log`, read while the process runs."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=_env(ext_dir), start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the builder and its ninja / compiler children
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _wait_for(predicate, timeout, what, proc, log):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"{what}: the process exited {proc.returncode}: {log.read_text()[-3000:]}")
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s: {log.read_text()[-3000:]}"
        time.sleep(0.2)


def _interrupted_build(code, ext_dir, lock, log):
    builder = _start(code, ext_dir, log)
    try:
        _wait_for(lambda: os.path.exists(lock), START_TIMEOUT_S, "torch's build lock", builder, log)
        time.sleep(1.0)  # inside the build (ninja running), as in the trial
    finally:
        _kill_group(builder)
    assert os.path.exists(lock), "SIGKILL cannot run torch's finally: the lock must stay behind"
    return builder


def _assert_stale_message(stderr, lock):
    assert f"{lock} is left from an interrupted build of DeepSpeed's fused_adam op" in stderr, stderr[-3000:]
    assert f"rm {lock}" in stderr and "safe to delete when no other build" in stderr, stderr[-3000:]


@requires_upstream
def test_train_entry_stops_on_a_lock_left_by_a_killed_deepspeed_build(tmp_path):
    """The issue's case: a DeepSpeed build killed mid-way; the next `llava_vla_plugin.train --deepspeed` run
    stops with rc 2, naming the lock and the `rm`, before any weight loads, instead of waiting forever; after
    that `rm` a run builds again."""
    ext = tmp_path / "ext"
    lock = os.path.join(_op_folder(ext), "lock")
    _interrupted_build(DEEPSPEED_BUILD, ext, lock, tmp_path / "builder.log")
    start = time.monotonic()
    from llava_vla_plugin.testing.vla_samples import colour_image, write_vla_dataset

    data = write_vla_dataset(tmp_path / "data", "ds", 2, image_fn=lambda i, r: colour_image(r, i),
                             action_fn=lambda i, r: r.uniform(-1, 1, 7))  # valid input: the bad-input check passes
    run = subprocess.run([sys.executable, "-m", "llava_vla_plugin.train", "--deepspeed", "configs/zero2.json",
                          "--data_path", str(data), "--image_folder", str(tmp_path / "data"),
                          "--output_dir", str(tmp_path / "run")], cwd=ROOT, env=_env(ext), capture_output=True,
                         text=True, timeout=DETECT_TIMEOUT_S)
    elapsed = time.monotonic() - start
    assert run.returncode == 2, run.stderr[-3000:]
    _assert_stale_message(run.stderr, lock)
    assert os.path.exists(lock), "the lock is the user's to delete (another host may share the folder)"
    print(f"stale lock reported by the train entry in {elapsed:.1f} s")
    # The printed remedy works: after the `rm`, the next run takes the lock and builds (interrupted again here).
    os.remove(lock)
    log = tmp_path / "after_rm.log"
    rebuild = _start(PLUGIN_BUILD, ext, log)
    try:
        _wait_for(lambda: "building DeepSpeed's fused_adam op" in log.read_text() and os.path.exists(lock),
                  DETECT_TIMEOUT_S, "the build after rm", rebuild, log)
    finally:
        _kill_group(rebuild)


def test_a_waiting_run_reports_the_lock_once_the_live_builder_is_killed(tmp_path):
    """Two plugin runs: the second waits (with a message) while the first builds, which is not a stale lock;
    once the builder is killed by SIGKILL, the waiting run stops with the stale-lock message in seconds."""
    ext = tmp_path / "ext"
    lock = os.path.join(_op_folder(ext), "lock")
    builder_log, waiter_log = tmp_path / "builder.log", tmp_path / "waiter.log"
    builder = _start(PLUGIN_BUILD, ext, builder_log)
    waiter = None
    try:
        _wait_for(lambda: os.path.exists(lock), START_TIMEOUT_S, "torch's build lock", builder, builder_log)
        waiter = _start(PLUGIN_BUILD, ext, waiter_log)
        # The waiter blocks on the builder's flock and says so; it must not call a live build's lock stale.
        _wait_for(lambda: "waiting for pid" in waiter_log.read_text(), DETECT_TIMEOUT_S, "the waiter's message",
                  waiter, waiter_log)
        assert f"pid {builder.pid} on" in waiter_log.read_text()
        assert builder.poll() is None, "the builder must still be building while the waiter waits"
        killed = time.monotonic()
        _kill_group(builder)
        waiter.wait(timeout=DETECT_TIMEOUT_S)
        elapsed = time.monotonic() - killed
    finally:
        for proc in (builder, waiter):
            if proc is not None and proc.poll() is None:
                _kill_group(proc)
    rest = waiter_log.read_text()
    assert waiter.returncode == 2, rest[-3000:]
    _assert_stale_message(rest, lock)
    print(f"stale lock reported {elapsed:.1f} s after the builder was killed")


def test_predicted_ops_follow_deepspeeds_choice():
    """deepspeed/runtime/engine.py get_optimizer_configuration: torch_adam builds nothing, offload uses CPU Adam."""
    zero2 = read_ds_config(str(ROOT / "configs/zero2.json"))
    assert predicted_op_builders(zero2) == ["FusedAdamBuilder"]
    assert predicted_op_builders(read_ds_config(str(ROOT / "configs/zero3.json"))) == ["FusedAdamBuilder"]
    assert predicted_op_builders({**zero2, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}) == []
    offload = {**zero2, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert predicted_op_builders(offload) == ["CPUAdamBuilder"]
    assert predicted_op_builders({k: v for k, v in zero2.items() if k != "optimizer"}) == []
