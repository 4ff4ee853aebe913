"""Import TensorFlow / tensorflow_datasets without their known C++ start-up lines.

data_tools reads RLDS through tensorflow_datasets, and TensorFlow writes its start-up lines to fd 2 before
absl logging exists, so TF_CPP_MIN_LOG_LEVEL cannot hide them: they bury the tools' own progress and
errors. This lives in data_tools (which never imports the plugin); llava_vla_plugin.core.env re-exports it.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import tempfile

# TensorFlow's C++ start-up lines, written to fd 2 before absl logging is initialised (so
# TF_CPP_MIN_LOG_LEVEL cannot hide them)
TF_STARTUP_LINES = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"),
    re.compile(r"^I\d{4} [\d:. ]+\d+ port\.cc:\d+\] oneDNN custom operations are on\."),
    re.compile(r"^I\d{4} [\d:. ]+\d+ cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized to use available CPU"),
    re.compile(r"^To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags\.$"),
    re.compile(r"^E\d{4} [\d:. ]+\d+ cuda_(dnn|fft|blas)\.cc:\d+\] Unable to register cu(DNN|FFT|BLAS) factory"),
    re.compile(r"^W\d{4} [\d:. ]+\d+ cuda_executor\.cc:\d+\] Could not find cuda drivers"),
)


@contextlib.contextmanager
def native_stderr_filtered(patterns=TF_STARTUP_LINES):
    """Capture fd 2 (C++ writes bypass sys.stderr), then replay every line no pattern matches."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines(keepends=True):
                if not any(p.search(line) for p in patterns):
                    sys.stderr.write(line)
            sys.stderr.flush()


def import_quietly(name: str):
    """`import tensorflow` / `tensorflow_datasets` without TensorFlow's known start-up lines."""
    if name in sys.modules:
        return sys.modules[name]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    with native_stderr_filtered():
        module = importlib.import_module(name)
        if name.startswith("tensorflow"):
            importlib.import_module("tensorflow")  # its lazy loader prints the start-up lines a second time
            try:
                import tensorflow as tf

                tf.constant(0)  # forces the lazy runtime load (the second batch of lines) inside the filter
            except Exception:  # noqa: BLE001 - a broken TF install fails loudly at its first real use
                pass
    return module
