"""A REST server for a VLA checkpoint that speaks OpenVLA's `vla-scripts/deploy.py` protocol.

    python -m llava_vla_plugin.serve --checkpoint runs/ov-vla [--host 127.0.0.1] [--port 8000]

Clients written for OpenVLA work unchanged:

    import json_numpy; json_numpy.patch()
    import numpy as np, requests
    action = requests.post("http://127.0.0.1:8000/act",
                           json={"image": np.zeros((256, 256, 3), dtype=np.uint8),
                                 "instruction": "pick up the block", "unnorm_key": "bridge_orig"}).json()

POST /act  body: {"image": <json-numpy (H, W, 3) uint8 array>, "instruction": str, "unnorm_key": str?}
           or the same object JSON-encoded in a string: {"encoded": "<json>"} (for clients without
           json-numpy). Answer: the action as a json-numpy array ({"__numpy__": base64, "dtype",
           "shape"}); for an "encoded" request, that JSON again encoded as a string, as deploy.py does.
           A plain nested list of 0..255 integers is accepted as the image too.
GET /health  {"status": "ok", "checkpoint", "datasets", "action_dim", "device", "dtype"}.
A malformed request gets a 4xx with {"error": message} (OpenVLA answers "error" with 200); the server
stays up. Requests are served by threads; the model runs one request at a time (VLAPolicy's lock).
Only the standard library is used for HTTP and for the json-numpy format (no json-numpy install).
Exit codes: 0 stopped by Ctrl-C / SIGTERM, 1 the checkpoint could not be loaded, 2 usage error.
"""
from __future__ import annotations

import argparse
import base64
import json
import logging
import signal
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

log = logging.getLogger("llava_vla_plugin.serve")
MAX_BODY_BYTES = 256 * 1024 * 1024


# ---- json-numpy wire format (the `json-numpy` package's, v2) -----------------------------------
def numpy_default(obj):
    """json.dumps(default=...) hook: numpy arrays/scalars -> {"__numpy__": b64, "dtype": descr, "shape": [...]}."""
    if isinstance(obj, (np.ndarray, np.generic)):
        arr = np.asarray(obj)
        return {"__numpy__": base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode("ascii"),
                "dtype": np.lib.format.dtype_to_descr(arr.dtype), "shape": list(arr.shape)}
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def numpy_hook(dct: dict):
    """json.loads(object_hook=...) hook: the inverse of numpy_default."""
    if "__numpy__" in dct:
        arr = np.frombuffer(base64.b64decode(dct["__numpy__"]), dtype=np.lib.format.descr_to_dtype(dct["dtype"]))
        shape = dct.get("shape")
        return arr.reshape(shape) if shape else arr[0]
    return dct


def dumps(obj) -> str:
    return json.dumps(obj, default=numpy_default)


def loads(text: str | bytes):
    return json.loads(text, object_hook=numpy_hook)


# ---- request handling --------------------------------------------------------------------------
class BadRequest(ValueError):
    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = int(status)


def parse_act_payload(body: bytes) -> tuple[np.ndarray, str, str | None, bool]:
    """-> (image, instruction, unnorm_key, double_encoded); raises BadRequest with a readable message."""
    try:
        payload = loads(body)
    except (ValueError, TypeError) as e:
        raise BadRequest(f"the body is not valid JSON / json-numpy: {e}") from None
    double = isinstance(payload, dict) and "encoded" in payload
    if double:
        if len(payload) != 1:
            raise BadRequest("an 'encoded' request must hold only the 'encoded' key")
        if not isinstance(payload["encoded"], str):
            raise BadRequest("'encoded' must be a string holding the JSON request")
        try:
            payload = loads(payload["encoded"])
        except (ValueError, TypeError) as e:
            raise BadRequest(f"'encoded' is not valid JSON / json-numpy: {e}") from None
    if not isinstance(payload, dict):
        raise BadRequest("expected a JSON object {'image': np.ndarray, 'instruction': str, 'unnorm_key': str (optional)}")
    if "instruction" not in payload:
        raise BadRequest("missing 'instruction' (a string)")
    instruction = payload["instruction"]
    if not isinstance(instruction, str) or not instruction.strip():
        raise BadRequest(f"'instruction' must be a non-empty string, got {type(instruction).__name__}")
    if "image" not in payload:
        raise BadRequest("missing 'image' (an (H, W, 3) uint8 array, json-numpy encoded)")
    image = payload["image"]
    if isinstance(image, list):
        try:
            arr = np.asarray(image)
        except ValueError as e:
            raise BadRequest(f"'image' as a list must be a regular (H, W, 3) nested list: {e}") from None
        if arr.dtype.kind in "iu" and arr.size and (arr.min() < 0 or arr.max() > 255):
            raise BadRequest("'image' as a list must hold integers in 0..255")
        if arr.dtype.kind not in "iu":
            raise BadRequest(f"'image' as a list must hold integers in 0..255, got {arr.dtype}")
        image = arr.astype(np.uint8)
    if not isinstance(image, np.ndarray):
        raise BadRequest(f"'image' must be a json-numpy encoded array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
        raise BadRequest(f"'image' must have shape (H, W, 3), got {tuple(image.shape)}")
    if image.dtype != np.uint8:
        raise BadRequest(f"'image' must be uint8, got {image.dtype}")
    unnorm_key = payload.get("unnorm_key")
    if unnorm_key is not None and not isinstance(unnorm_key, str):
        raise BadRequest(f"'unnorm_key' must be a string, got {type(unnorm_key).__name__}")
    return image, instruction, unnorm_key, double


class PolicyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, policy):
        self.policy = policy
        self.requests_served = 0
        self._count_lock = threading.Lock()
        super().__init__(address, ActHandler)


class ActHandler(BaseHTTPRequestHandler):
    server: PolicyServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # through logging, not bare stderr
        log.info("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, json.dumps({"error": message}))

    def do_GET(self):
        if self.path.rstrip("/") in ("/health", ""):
            p = self.server.policy
            self._send(200, json.dumps({"status": "ok", "checkpoint": p.checkpoint, "datasets": p.dataset_names,
                                        "action_dim": p.action_dim, "device": str(p.device), "dtype": str(p.dtype),
                                        "requests_served": self.server.requests_served}))
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint {self.path}; use POST /act or GET /health")

    def do_POST(self):
        if self.path.rstrip("/") != "/act":
            # Drain the body so the connection stays usable.
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint {self.path}; use POST /act")
            return
        try:
            length = int(self.headers.get("Content-Length") or -1)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
            return
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes exceeds {MAX_BODY_BYTES}")
            return
        body = self.rfile.read(length)
        from llava_vla_plugin.normalization import UnnormKeyError, resolve_unnorm_key
        from llava_vla_plugin.policy import ImageInputError

        policy = self.server.policy
        try:
            image, instruction, unnorm_key, double = parse_act_payload(body)
            resolve_unnorm_key(policy.norm_stats, unnorm_key)
        except BadRequest as e:
            self._error(e.status, str(e))
            return
        except UnnormKeyError as e:
            self._error(HTTPStatus.BAD_REQUEST, str(e))
            return
        try:
            t0 = time.perf_counter()
            action = policy.predict_action(image, instruction, unnorm_key=unnorm_key)
            log.debug("action in %.3f s", time.perf_counter() - t0)
        except ImageInputError as e:
            self._error(HTTPStatus.BAD_REQUEST, str(e))
            return
        except Exception as e:  # noqa: BLE001 - a failed request must not take the server down
            log.exception("prediction failed")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}")
            return
        with self.server._count_lock:
            self.server.requests_served += 1
        out = dumps(action)
        self._send(200, json.dumps(out) if double else out)


def make_server(policy, host: str = "127.0.0.1", port: int = 8000) -> PolicyServer:
    return PolicyServer((host, port), policy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_vla_plugin.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json, weights, "
                        "vla_action_tokenizer.json, dataset_statistics.json)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one, printed at start)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="weights dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from llava_vla_plugin.policy import VLAPolicy

    try:
        policy = VLAPolicy.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype)
    except (OSError, ValueError) as e:
        print(f"error: cannot load {args.checkpoint}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    try:
        server = make_server(policy, args.host, args.port)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    host, port = server.server_address[:2]
    print(f"llava_vla_plugin.serve: serving {args.checkpoint} on http://{host}:{port} "
          f"(POST /act, GET /health; datasets: {policy.dataset_names})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
