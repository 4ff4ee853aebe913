"""The OpenVLA-compatible REST server: wire format, 4xx for malformed requests, correct and concurrent answers.

The server runs as `python -m llava_vla_plugin.serve` on 127.0.0.1 with a free port; the client is
plain urllib with the json-numpy wire format written out here, as an OpenVLA client sends it.
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, requires_upstream, run_py
from llava_vla_plugin.serve import BadRequest, dumps, loads, parse_act_payload
from test_policy import policy_results


def encode_array(a: np.ndarray) -> dict:
    """json-numpy's encoding (what `json_numpy.patch()` makes requests/json send)."""
    return {"__numpy__": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode(), "dtype": a.dtype.str,
            "shape": list(a.shape)}


def decode_array(d: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["__numpy__"]), dtype=np.dtype(d["dtype"])).reshape(d["shape"])


# ---- wire format and request parsing (no model) ------------------------------------------------
def test_json_numpy_format():
    a = np.array([[1, 2, 3]], dtype=np.uint8)
    assert json.loads(dumps(a)) == {"__numpy__": "AQID", "dtype": "|u1", "shape": [1, 3]}
    f = np.array([0.5, -1.25])
    assert np.array_equal(loads(json.dumps(encode_array(f))), f)
    assert loads(dumps({"x": np.float64(2.5)}))["x"] == 2.5  # numpy scalars: shape [] -> scalar
    try:  # the real package, where installed, agrees both ways
        import json_numpy
    except ImportError:
        return
    assert np.array_equal(json_numpy.loads(dumps(f)), f)
    assert np.array_equal(loads(json_numpy.dumps(a)), a)


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
    ]
    for body, msg in bad:
        with pytest.raises(BadRequest, match=msg):
            parse_act_payload(body.encode() if isinstance(body, str) else body)


def test_cli_help_and_usage_errors():
    proc = run_py(["-m", "llava_vla_plugin.serve", "--help"])
    assert proc.returncode == 0 and "POST /act" in proc.stdout and "--checkpoint" in proc.stdout
    assert run_py(["-m", "llava_vla_plugin.serve"]).returncode == 2  # --checkpoint is required


# ---- a live server on the trained tiny checkpoint ----------------------------------------------
@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    info, results = policy_results(tiny_model, tmp_path_factory)
    log_dir = tmp_path_factory.mktemp("serve")
    out, err = open(log_dir / "stdout", "w"), open(log_dir / "stderr", "w")
    proc = subprocess.Popen([sys.executable, "-m", "llava_vla_plugin.serve", "--checkpoint", str(info["ckpt"]),
                             "--host", "127.0.0.1", "--port", "0"], cwd=ROOT, env=info["env"], stdout=out, stderr=err)
    url = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        line = (log_dir / "stdout").read_text()
        if "serving" in line:
            url = line.split(" on ", 1)[1].split()[0]
            break
        time.sleep(0.2)
    if url is None:
        proc.kill()
        pytest.fail(f"server did not start: {(log_dir / 'stderr').read_text()[-4000:]}")
    yield url, results
    proc.terminate()
    try:
        assert proc.wait(timeout=20) == 0  # SIGTERM: a clean stop
    finally:
        if proc.poll() is None:
            proc.kill()
        out.close()
        err.close()


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
