"""The OpenVLA-compatible REST server: wire format, 4xx for malformed requests, correct and concurrent answers.

The server runs as `python -m llava_vla_plugin.infer.serve` on 127.0.0.1 with a free port; the client is
plain urllib with the json-numpy wire format written out here, as an OpenVLA client sends it.
"""
from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import json_numpy
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, requires_upstream, run_py
from llava_vla_plugin.infer.serve import BadRequest, decode_json, parse_act_payload, response_action
from test_policy import policy_results


def encode_array(a: np.ndarray) -> dict:
    """json-numpy's encoding (what `json_numpy.patch()` makes requests/json send)."""
    return {"__numpy__": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode(), "dtype": a.dtype.str,
            "shape": list(a.shape)}


def decode_array(d: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["__numpy__"]), dtype=np.dtype(d["dtype"])).reshape(d["shape"])


# ---- wire format and request parsing (no model) ------------------------------------------------
def test_json_numpy_format_is_the_packages():
    a = np.array([[1, 2, 3]], dtype=np.uint8)
    assert json.loads(json_numpy.dumps(a)) == {"__numpy__": "AQID", "dtype": "|u1", "shape": [1, 3]}
    f = np.array([0.5, -1.25])
    assert np.array_equal(decode_json(json.dumps(encode_array(f))), f)  # this file's hand encoding
    assert np.array_equal(decode_json(json_numpy.dumps({"x": f}))["x"], f)
    assert decode_json(json_numpy.dumps({"x": np.float64(2.5)}))["x"] == 2.5  # numpy scalars: shape [] -> scalar


def test_response_shape_rule():
    # The policy answers (D,) today; chunked checkpoints (H, D) come later, so [H, D] is a made-up array here.
    assert response_action(np.arange(7.0)).shape == (7,)
    assert response_action(np.arange(7.0)[None]).shape == (7,)  # a 1-step chunk answers as OpenVLA does
    chunk = np.arange(56.0).reshape(8, 7)
    assert np.array_equal(response_action(chunk), chunk)  # OFT's deploy.py answers the whole chunk
    for bad in (np.zeros(()), np.zeros((0,)), np.zeros((2, 3, 4))):
        with pytest.raises(ValueError, match="expected \\(D,\\) or \\(H, D\\)"):
            response_action(bad)


def test_parse_act_payload_accepts_openvla_forms_and_refuses_bad_ones():
    img = np.zeros((4, 6, 3), np.uint8)
    body = json.dumps({"image": encode_array(img), "instruction": "go", "unnorm_key": "k"}).encode()
    image, instruction, key, double = parse_act_payload(body)
    assert image.shape == (4, 6, 3) and instruction == "go" and key == "k" and not double
    inner = json.dumps({"image": encode_array(img), "instruction": "go"})
    image, _, key, double = parse_act_payload(json.dumps({"encoded": inner}).encode())
    assert double and key is None and image.dtype == np.uint8
    image, *_ = parse_act_payload(json.dumps({"image": img.tolist(), "instruction": "go"}).encode())
    assert image.dtype == np.uint8 and image.shape == (4, 6, 3)
    bad = [
        (b"{not json", "not valid JSON"),
        (json.dumps({"image": encode_array(img)}), "missing 'instruction'"),
        (json.dumps({"image": encode_array(img), "instruction": ""}), "non-empty string"),
        (json.dumps({"instruction": "go"}), "missing 'image'"),
        (json.dumps({"image": encode_array(np.zeros((4, 6), np.uint8)), "instruction": "go"}), r"shape \(H, W, 3\), got \(4, 6\)"),
        (json.dumps({"image": encode_array(np.zeros((4, 6, 4), np.uint8)), "instruction": "go"}), "got \\(4, 6, 4\\)"),
        (json.dumps({"image": encode_array(np.zeros((4, 6, 3), np.float32)), "instruction": "go"}), "must be uint8, got float32"),
        (json.dumps({"image": [[[300, 0, 0]]], "instruction": "go"}), "0..255"),
        (json.dumps({"image": "abc", "instruction": "go"}), "json-numpy encoded array"),
        (json.dumps({"image": encode_array(img), "instruction": "go", "unnorm_key": 3}), "'unnorm_key' must be a string"),
        (json.dumps({"encoded": inner, "x": 1}), "only the 'encoded' key"),
        (json.dumps([1, 2]), "expected a JSON object"),
        (json.dumps({"image": encode_array(np.zeros((1, 1, 3), np.uint8)), "instruction": "go"}), "1x1 pixels"),
        (json.dumps({"image": {"__numpy__": "AQID", "shape": [3]}, "instruction": "go"}), r"missing \['dtype'\]"),
        (json.dumps({"image": {"__numpy__": "", "dtype": "|u1", "shape": [0]}, "instruction": "go"}), "non-empty base64"),
        (json.dumps({"image": {"__numpy__": "AQID", "dtype": "|u1", "shape": [2, 2]}, "instruction": "go"}),
         "holds 3 bytes but dtype '|u1' and shape \\[2, 2\\] need 4"),
        (json.dumps({"image": {"__numpy__": "AQID", "dtype": "|O", "shape": [3]}, "instruction": "go"}), "Python objects"),
        (json.dumps({"image": {"__numpy__": "A?ID", "dtype": "|u1", "shape": [3]}, "instruction": "go"}), "not valid base64"),
        ("[" * 100_000 + "]" * 100_000, "nests JSON arrays/objects deeper"),
    ]
    for body, msg in bad:
        with pytest.raises(BadRequest, match=msg):
            parse_act_payload(body.encode() if isinstance(body, str) else body)


def test_cli_help_and_usage_errors():
    proc = run_py(["-m", "llava_vla_plugin.infer.serve", "--help"])
    assert proc.returncode == 0 and "POST /act" in proc.stdout and "--checkpoint" in proc.stdout
    for flag in ("--max-body-mb", "--request-timeout", "--max-decodes", "--backlog"):
        assert flag in proc.stdout
    assert run_py(["-m", "llava_vla_plugin.infer.serve"]).returncode == 2  # --checkpoint is required
    proc = run_py(["-m", "llava_vla_plugin.infer.serve", "--checkpoint", "x", "--max-decodes", "0"])
    assert proc.returncode == 2 and "--max-decodes must be positive" in proc.stderr


# ---- a live server on the trained tiny checkpoint ----------------------------------------------
@contextlib.contextmanager
def running_server(ckpt, env: dict, log_dir: Path, *args: str, preexec_fn=None):
    """`python -m llava_vla_plugin.infer.serve` on 127.0.0.1 with a free port (--port 0: tests run in parallel
    sessions on one machine) -> (url, process); stopped with SIGTERM, which must exit 0."""
    out, err = open(log_dir / "stdout", "w"), open(log_dir / "stderr", "w")
    proc = subprocess.Popen([sys.executable, "-m", "llava_vla_plugin.infer.serve", "--checkpoint", str(ckpt),
                             "--host", "127.0.0.1", "--port", "0", *args], cwd=ROOT, env=env, stdout=out, stderr=err,
                            preexec_fn=preexec_fn)
    url = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        line = (log_dir / "stdout").read_text()
        if "serving" in line:
            url = line.split(" on ", 1)[1].split()[0]
            break
        time.sleep(0.2)
    try:
        if url is None:
            pytest.fail(f"server did not start: {(log_dir / 'stderr').read_text()[-4000:]}")
        yield url, proc
        proc.terminate()
        assert proc.wait(timeout=30) == 0, (log_dir / "stderr").read_text()[-4000:]  # SIGTERM: a clean stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
        err.close()


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """The server with every limit at its default."""
    info, results = policy_results(tiny_model, tmp_path_factory)
    with running_server(info["ckpt"], info["env"], tmp_path_factory.mktemp("serve")) as (url, _):
        yield url, results


def post(url: str, payload, raw: bytes | None = None) -> tuple[int, object]:
    data = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(url + "/act", data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def case_payload(case: dict, **extra) -> dict:
    img = np.asarray(Image.open(case["image"]).convert("RGB"))
    return {"image": encode_array(img), "instruction": case["instruction"], "unnorm_key": case["unnorm_key"], **extra}


@requires_upstream
def test_server_answers_like_predict_action(served):
    url, results = served
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["datasets"] == ["ds_a", "ds_b"] and health["action_dim"] == 7
    case = results["cases"][0]
    status, body = post(url, case_payload(case))
    assert status == 200
    action = decode_array(body)
    assert action.dtype == np.float64 and action.shape == (7,)
    assert action.tolist() == case["policy_action"] == case["hand_action"]
    # OpenVLA's double-encoded form: {"encoded": json} in, a JSON string holding the json-numpy array out
    case = results["cases"][1]
    status, body = post(url, {"encoded": json.dumps(case_payload(case))})
    assert status == 200 and isinstance(body, str)
    assert decode_array(json.loads(body)).tolist() == case["policy_action"]


OPENVLA_CLIENT = """
import sys
import json_numpy
json_numpy.patch()
import numpy as np, requests
from PIL import Image
url, image, instruction, unnorm_key = sys.argv[1:]
action = requests.post(url + "/act", json={"image": np.asarray(Image.open(image).convert("RGB")),
                                           "instruction": instruction, "unnorm_key": unnorm_key}).json()
print(json_numpy.dumps(action))
"""


@requires_upstream
def test_openvla_client_as_written(served):
    """The client snippet of OpenVLA's deploy.py (requests + json_numpy.patch()), in its own process:
    patch() replaces the json module's functions process-wide."""
    url, results = served
    case = results["cases"][2]
    proc = run_py(["-c", OPENVLA_CLIENT, url, case["image"], case["instruction"], case["unnorm_key"]], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    action = json_numpy.loads(proc.stdout)
    assert isinstance(action, np.ndarray) and action.shape == (7,) and action.tolist() == case["policy_action"]


@requires_upstream
def test_server_refuses_malformed_requests_and_stays_up(served):
    url, results = served
    case = results["cases"][0]
    good = case_payload(case)
    img = np.asarray(Image.open(case["image"]).convert("RGB"))
    checks = [
        ({k: v for k, v in good.items() if k != "instruction"}, 400, "missing 'instruction'"),
        (dict(good, image=encode_array(img[..., 0])), 400, "shape (H, W, 3)"),
        (dict(good, image=encode_array(img.astype(np.float32))), 400, "uint8"),
        (dict(good, unnorm_key="bridge_orig"), 400, "unknown unnorm_key 'bridge_orig'"),
        ({k: v for k, v in good.items() if k != "unnorm_key"}, 400, "pass unnorm_key, one of: ['ds_a', 'ds_b']"),
    ]
    for payload, code, msg in checks:
        status, body = post(url, payload)
        assert status == code and msg in body["error"], (status, body)
    status, body = post(url, None, raw=b"{oops")
    assert status == 400 and "not valid JSON" in body["error"]
    try:
        urllib.request.urlopen(url + "/nope", timeout=30)
        raise AssertionError("404 expected")
    except urllib.error.HTTPError as e:
        assert e.code == 404
    status, body = post(url, good)  # still serving, still right
    assert status == 200 and decode_array(body).tolist() == case["policy_action"]


@requires_upstream
def test_concurrent_requests_get_their_own_answers(served):
    url, results = served
    cases = results["cases"]
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        answers = list(pool.map(lambda c: post(url, case_payload(c)), cases))
    for (status, body), case in zip(answers, cases):
        assert status == 200 and decode_array(body).tolist() == case["policy_action"]
