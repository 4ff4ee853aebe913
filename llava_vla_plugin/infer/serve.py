"""A REST server for a VLA checkpoint that speaks OpenVLA's `vla-scripts/deploy.py` protocol.

    python -m llava_vla_plugin.infer.serve --checkpoint runs/ov-vla [--host 127.0.0.1] [--port 8000]

Clients written for OpenVLA work unchanged:

    import json_numpy; json_numpy.patch()
    import numpy as np, requests
    action = requests.post("http://127.0.0.1:8000/act",
                           json={"image": np.zeros((256, 256, 3), dtype=np.uint8),
                                 "instruction": "pick up the block", "unnorm_key": "bridge_orig"}).json()

POST /act  body: {"image": <json-numpy (H, W, 3) uint8 array>, "instruction": str, "unnorm_key": str?,
                  "wrist_image": array?, "state": [floats]?}
           (`wrist_image` and `state`, and `full_image` for `image`, are OpenVLA-OFT's deploy.py fields; a checkpoint
           trained with the wrist view or the state needs them and answers 400 naming the missing one)
           or the same object JSON-encoded in a string: {"encoded": "<json>"} (for clients without
           json-numpy). Answer: the action as a json-numpy array: shape (D,) for a single-step
           checkpoint (as OpenVLA answers), (H, D) for a checkpoint that predicts H-step chunks (as
           OpenVLA-OFT's deploy.py answers; iterating it gives OFT's list of H actions). For an
           "encoded" request the answer is that JSON again encoded as a string, as deploy.py does.
           A plain nested list of 0..255 integers is accepted as the image too.
GET /health  {"status": "ok", "checkpoint", "datasets", "action_dim", "device", "dtype", counters, limits}.
Every malformed request gets a 4xx answer {"error": message} naming the problem (OpenVLA answers
"error" with 200); the server stays up.

Stack: FastAPI on uvicorn (h11), arrays in the `json-numpy` package's format, as OpenVLA's deploy.py.
Added here because uvicorn lacks them, each where it takes effect:
  --request-timeout  a request must arrive completely within this many seconds of the connection
                     opening or of the previous answer; idle and stalled connections are closed (a
                     stalled partial request gets 408). uvicorn's keep-alive timer stops at the first
                     byte, so alone it lets a trickling client hold a socket forever. Time the server
                     is behind (body bytes buffered that the application has not taken yet) does not
                     count against the client.
  --max-body-mb      body cap checked by the HTTP protocol on every path (404s included) from the
                     Content-Length header before any body byte is read, and on the streamed size.
  --max-decodes      requests that may decode and predict at once (the rest wait with their raw
                     body, at most --max-body-mb each), so the decoded arrays and image tensors, several
                     times the body's size, stay bounded under a burst of large images.
  --backlog          listen backlog: a burst of concurrent clients is queued, not refused.
--unnorm-key KEY is the key of requests that send none (a request's own `unnorm_key` wins). The
checkpoint's dataset_statistics.json and --unnorm-key are checked before the model loads, also with
--dry-run (which then prints the settings and stops).
Exit codes: 0 stopped by Ctrl-C / SIGTERM (or a --dry-run that passed), 1 the checkpoint could not be
loaded or the address could not be bound, 2 usage error (including a missing or unreadable
dataset_statistics.json and an unknown --unnorm-key).
"""
from __future__ import annotations

import argparse
import asyncio
import binascii
import json
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from http import HTTPStatus

import h11
import json_numpy
import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("llava_vla_plugin.infer.serve")

# transformers' image processors guess the channel axis from the array shape and read a side of 1 or
# 3 pixels as channels (a 1x1 image fails deep inside preprocessing, a 3-row one would be misread),
# so the server refuses images smaller than this on either side instead of answering 500.
MIN_IMAGE_SIDE = 4


@dataclass(frozen=True)
class ServerLimits:
    """The limits uvicorn lacks (see the module docstring); one record so the CLI, /health and tests agree."""
    max_body_bytes: int = 256 * 1024 * 1024
    request_timeout_s: float = 30.0
    max_decodes: int = 2
    backlog: int = 2048


# ---- json-numpy wire format, checked ------------------------------------------------------------
class BadRequest(ValueError):
    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = int(status)


def checked_numpy_hook(dct: dict):
    """json-numpy's object_hook, after checking the object so that a malformed one is a named 400.

    The package's own hook raises bare KeyError / IndexError / binascii.Error (and would build an
    array from a byte count that does not match the shape); those name nothing a client can act on.
    """
    if "__numpy__" not in dct:
        return dct
    missing = [k for k in ("dtype", "shape") if k not in dct]
    if missing:
        raise BadRequest(f"a json-numpy array object needs '__numpy__', 'dtype' and 'shape'; missing {missing} "
                         "(encode arrays with json_numpy.dumps or json_numpy.patch())")
    data, descr, shape = dct["__numpy__"], dct["dtype"], dct["shape"]
    if not isinstance(data, str) or not data:
        raise BadRequest("a json-numpy array's '__numpy__' must be a non-empty base64 string")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise BadRequest(f"a json-numpy array's 'shape' must be a list of non-negative integers, got {shape!r}")
    try:
        dtype = np.lib.format.descr_to_dtype(descr)
    except (TypeError, ValueError) as e:
        raise BadRequest(f"a json-numpy array has an unknown 'dtype' {descr!r}: {e}") from None
    if dtype.hasobject:
        raise BadRequest(f"a json-numpy array's dtype {descr!r} holds Python objects; send a numeric dtype")
    try:
        n_bytes = len(binascii.a2b_base64(data, strict_mode=True))
    except binascii.Error as e:
        raise BadRequest(f"a json-numpy array's '__numpy__' is not valid base64: {e}") from None
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize
    if n_bytes != need:
        raise BadRequest(f"a json-numpy array holds {n_bytes} bytes but dtype {descr!r} and shape {shape} need {need}")
    return json_numpy.object_hook(dct)


def decode_json(text: str | bytes, what: str = "the body"):
    """JSON with json-numpy arrays -> Python objects; every failure is a BadRequest naming the problem."""
    try:
        return json.loads(text, object_hook=checked_numpy_hook)
    except RecursionError:
        raise BadRequest(f"{what} nests JSON arrays/objects deeper than the parser allows; "
                         "send a flat {'image', 'instruction', 'unnorm_key'} object") from None
    except UnicodeDecodeError as e:
        raise BadRequest(f"{what} is not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise BadRequest(f"{what} is not valid JSON: {e}") from None


def _checked_image(value, name: str) -> np.ndarray:
    """An (H, W, 3) uint8 image from a json-numpy array or a nested list of 0..255 integers; BadRequest names `name`."""
    image = value
    if isinstance(image, list):
        try:
            arr = np.asarray(image)
        except ValueError as e:
            raise BadRequest(f"'{name}' as a list must be a regular (H, W, 3) nested list: {e}") from None
        if arr.dtype.kind not in "iu":
            raise BadRequest(f"'{name}' as a list must hold integers in 0..255, got {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise BadRequest(f"'{name}' as a list must hold integers in 0..255")
        image = arr.astype(np.uint8)
    if not isinstance(image, np.ndarray):
        raise BadRequest(f"'{name}' must be a json-numpy encoded array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise BadRequest(f"'{name}' must have shape (H, W, 3), got {tuple(image.shape)}")
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:
        raise BadRequest(f"'{name}' is {image.shape[0]}x{image.shape[1]} pixels; send at least "
                         f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} (the camera frame, as in training)")
    if image.dtype != np.uint8:
        raise BadRequest(f"'{name}' must be uint8, got {image.dtype}")
    return image


@dataclass
class ActRequest:
    """One /act request. `wrist_image` and `state` are OpenVLA-OFT's deploy.py observation fields (its
    experiments/robot/openvla_utils.py get_vla_action reads obs["full_image"], the keys holding "wrist", and
    obs["state"]); OFT's `full_image` is accepted for `image`."""

    image: np.ndarray
    instruction: str
    unnorm_key: str | None
    double_encoded: bool
    wrist_image: np.ndarray | None = None
    state: np.ndarray | None = None


def parse_act_request(body: bytes) -> ActRequest:
    """The request, checked; raises BadRequest with a readable message."""
    payload = decode_json(body)
    double = isinstance(payload, dict) and "encoded" in payload
    if double:
        if len(payload) != 1:
            raise BadRequest("an 'encoded' request must hold only the 'encoded' key")
        if not isinstance(payload["encoded"], str):
            raise BadRequest("'encoded' must be a string holding the JSON request")
        payload = decode_json(payload["encoded"], "'encoded'")
    if not isinstance(payload, dict):
        raise BadRequest("expected a JSON object {'image': np.ndarray, 'instruction': str, 'unnorm_key': str (optional)}")
    if "instruction" not in payload:
        raise BadRequest("missing 'instruction' (a string)")
    instruction = payload["instruction"]
    if not isinstance(instruction, str) or not instruction.strip():
        raise BadRequest(f"'instruction' must be a non-empty string, got {type(instruction).__name__}")
    name = "image" if "image" in payload or "full_image" not in payload else "full_image"
    if name not in payload:
        raise BadRequest("missing 'image' (an (H, W, 3) uint8 array, json-numpy encoded; OFT's 'full_image' also works)")
    image = _checked_image(payload[name], name)
    unnorm_key = payload.get("unnorm_key")
    if unnorm_key is not None and not isinstance(unnorm_key, str):
        raise BadRequest(f"'unnorm_key' must be a string, got {type(unnorm_key).__name__}")
    wrist = _checked_image(payload["wrist_image"], "wrist_image") if payload.get("wrist_image") is not None else None
    state = payload.get("state")
    if state is not None:
        try:
            state = np.asarray(state, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise BadRequest("'state' must be a flat list or array of numbers (the robot's proprio state)") from None
        if not state.size or not np.all(np.isfinite(state)):
            raise BadRequest(f"'state' must hold finite numbers, got {state.tolist()[:10]}")
    return ActRequest(image, instruction, unnorm_key, double, wrist, state)


def parse_act_payload(body: bytes) -> tuple[np.ndarray, str, str | None, bool]:
    """-> (image, instruction, unnorm_key, double_encoded); raises BadRequest with a readable message."""
    r = parse_act_request(body)
    return r.image, r.instruction, r.unnorm_key, r.double_encoded


def response_action(action) -> np.ndarray:
    """The one rule for the answer's shape: (D,) stays (D,); [1, D] -> (D,) as OpenVLA answers a
    single-step checkpoint; [H, D] with H > 1 stays (H, D), as OpenVLA-OFT's deploy.py answers chunks."""
    action = np.asarray(action)
    if action.ndim == 2 and action.shape[0] == 1:
        return action[0]
    if action.ndim in (1, 2) and action.size:
        return action
    raise ValueError(f"the policy returned an action of shape {action.shape}; expected (D,) or (H, D)")


# ---- the HTTP protocol: deadline and body cap where uvicorn reads the socket --------------------
class _Refusal(h11.RemoteProtocolError):
    """Raised from the h11 event stream to refuse a request; uvicorn answers it via send_400_response."""

    def __init__(self, status: int, message: str):
        super().__init__(message, error_status_hint=status)
        self.status, self.message = status, message


class _GuardedConnection(h11.Connection):
    """h11 connection that caps each request body as it is parsed (Content-Length first, then the
    streamed size, so a chunked body is capped too) and remembers why it refused a request."""

    def __init__(self, max_body_bytes: int, max_incomplete_event_size: int):
        super().__init__(h11.SERVER, max_incomplete_event_size=max_incomplete_event_size)
        self.max_body_bytes = max_body_bytes
        self.refusal: _Refusal | None = None
        self._body_bytes = 0

    def _refuse(self, status: int, message: str):
        self.refusal = _Refusal(status, message)
        raise self.refusal

    def next_event(self):
        try:
            event = super().next_event()
        except _Refusal:
            raise
        except h11.RemoteProtocolError as e:
            self.refusal = _Refusal(e.error_status_hint, f"malformed HTTP request: {e}")
            raise
        cap = self.max_body_bytes
        if isinstance(event, h11.Request):
            self._body_bytes = 0
            for name, value in event.headers:
                if name == b"content-length" and int(value) > cap:  # h11 has checked it is one integer
                    self._refuse(413, f"request body of {int(value)} bytes exceeds the server's cap of {cap} bytes "
                                      "(--max-body-mb); send a smaller image")
        elif isinstance(event, h11.Data):
            self._body_bytes += len(event.data)
            if self._body_bytes > cap:
                self._refuse(413, f"request body exceeds the server's cap of {cap} bytes (--max-body-mb); "
                                  "send a smaller image")
        return event


def _raw_json_response(status: int, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    reason = HTTPStatus(status).phrase
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for receiving a whole request and the body cap.

    Subclassing the protocol is where both take effect: ASGI middleware runs only after the headers
    are parsed and never sees an idle socket, a half-sent header or the body of a 404.
    """

    limits = ServerLimits()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conn = _GuardedConnection(self.limits.max_body_bytes, self.conn._max_incomplete_event_size)
        self._deadline: asyncio.TimerHandle | None = None
        self._armed_cycle = None  # the request cycle that was current when the deadline was armed
        self._bytes_since_armed = False

    def _arm_deadline(self) -> None:
        self._cancel_deadline()
        self._armed_cycle, self._bytes_since_armed = self.cycle, False
        self._deadline = self.loop.call_later(self.limits.request_timeout_s, self._on_deadline)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _current_request_received(self) -> bool:
        cycle = self.cycle
        return cycle is not None and cycle is not self._armed_cycle and (not cycle.more_body or cycle.response_complete)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_deadline()

    def data_received(self, data: bytes) -> None:
        self._bytes_since_armed = True
        super().data_received(data)
        if self._current_request_received():
            self._cancel_deadline()  # the application's turn; the next request is timed from its answer

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm_deadline()  # before super(): it may parse a pipelined request right away
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _on_deadline(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self._current_request_received():
            return
        cycle = self.cycle if self.cycle is not self._armed_cycle else None
        if self.flow.read_paused or (cycle is not None and not cycle.response_started and cycle.body):
            # The server is behind, not the client: it holds body bytes the application has not taken
            # yet, or it paused reading. Look again shortly: the clock runs on once the application
            # has taken the bytes, so a trickling client gains at most that short recheck.
            self._deadline = self.loop.call_later(min(0.5, self.limits.request_timeout_s), self._on_deadline)
            return
        if self._bytes_since_armed and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and (
                cycle is None or not cycle.response_started):
            log.warning("%s: request not received within %.1f s; closing", self.client, self.limits.request_timeout_s)
            self.transport.write(_raw_json_response(
                408, f"the request was not received completely within {self.limits.request_timeout_s:g} s "
                     "(--request-timeout); send it in one go"))
        if cycle is not None:
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a refused request, as JSON naming the problem (uvicorn's is plain text)."""
        refusal = self.conn.refusal or _Refusal(400, f"malformed HTTP request: {msg}")
        self.conn.refusal = None
        log.warning("%s: refused: %s", self.client, refusal.message)
        cycle = self.cycle if self.cycle is not None and not self.cycle.response_complete else None
        if cycle is not None:  # the application must not answer on this connection any more
            cycle.disconnected = True
            cycle.message_event.set()
        state = self.conn.our_state
        if state is h11.IDLE or (state is h11.SEND_RESPONSE and not (cycle is not None and cycle.response_started)):
            self.transport.write(_raw_json_response(refusal.status, refusal.message))
        self.transport.close()


def make_protocol_class(limits: ServerLimits) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


# ---- the application ------------------------------------------------------------------------------
class DecodeGate:
    """At most `slots` requests decode and predict at once; counts the current and peak number
    (reported by /health so a test can check the bound holds)."""

    def __init__(self, slots: int):
        self.slots = slots
        self._sem = asyncio.Semaphore(slots)
        self.active = 0
        self.peak = 0

    async def __aenter__(self):
        await self._sem.acquire()
        self.active += 1
        self.peak = max(self.peak, self.active)

    async def __aexit__(self, *exc):
        self.active -= 1
        self._sem.release()


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=int(status))


def create_app(policy, limits: ServerLimits = ServerLimits(), unnorm_key: str | None = None) -> FastAPI:
    """`unnorm_key`: the key of requests that send none (serve's --unnorm-key)."""
    from llava_vla_plugin.core.inputs import InputConfigError, MissingInputError
    from llava_vla_plugin.core.normalization import UnnormKeyError
    from llava_vla_plugin.infer.pipeline import ImageInputError

    app = FastAPI(title="llava_vla_plugin policy server", docs_url=None, redoc_url=None, openapi_url=None)
    gate = DecodeGate(limits.max_decodes)
    counters = {"requests_served": 0}
    count_lock = threading.Lock()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        hint = "use POST /act or GET /health"
        return error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}; {hint}")

    @app.get("/")
    @app.get("/health")
    async def health():
        return {"status": "ok", "checkpoint": policy.checkpoint, "datasets": policy.dataset_names,
                "action_dim": policy.action_dim, "device": str(policy.device), "dtype": str(policy.dtype),
                "requests_served": counters["requests_served"], "decoding": gate.active, "decoding_peak": gate.peak,
                "limits": asdict(limits)}

    def decode_and_predict(body: bytes) -> str:
        req = parse_act_request(body)
        del body
        t0 = time.perf_counter()
        # the wrist view and the state only where the checkpoint was trained on them (the policy refuses a request
        # without them with MissingInputError; OpenVLA-style policies take the image and instruction alone)
        extra = {k: v for k, v in (("wrist_image", req.wrist_image), ("proprio", req.state)) if v is not None}
        inputs = getattr(policy, "inputs", None)
        if inputs is None or inputs.is_default:
            extra = {}
        action = response_action(policy.predict_action(req.image, req.instruction, unnorm_key=req.unnorm_key or unnorm_key,
                                                       **extra))
        log.debug("action in %.3f s", time.perf_counter() - t0)
        out = json_numpy.dumps(action)
        return json.dumps(out) if req.double_encoded else out

    @app.post("/act")
    async def act(request: Request):
        # The body is read before the gate: a stalled client then times out without holding a slot.
        try:
            body = await request.body()
        except ClientDisconnect:  # refused by the protocol (cap, deadline) or the client left
            return Response(status_code=400)
        async with gate:
            try:
                out = await run_in_threadpool(decode_and_predict, body)
            except BadRequest as e:
                return error(e.status, str(e))
            except (UnnormKeyError, ImageInputError, MissingInputError, InputConfigError) as e:
                return error(HTTPStatus.BAD_REQUEST, str(e))
            except Exception as e:  # noqa: BLE001 - a failed request must not take the server down
                log.exception("prediction failed")
                return error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}")
        with count_lock:
            counters["requests_served"] += 1
        return Response(out, media_type="application/json")

    return app


# ---- running it -----------------------------------------------------------------------------------
def bind(host: str, port: int, backlog: int) -> socket.socket:
    """The listening socket, bound before the (slow) model load so a taken port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def raise_open_file_limit() -> None:
    """Each open connection is a file descriptor; the common soft limit of 1,024 is far below the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


class _Server(uvicorn.Server):
    """uvicorn's server, printing the line that says where it serves once it accepts connections."""

    def __init__(self, config: uvicorn.Config, banner: str):
        super().__init__(config)
        self.banner = banner

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            print(self.banner, flush=True)


def serve(policy, sock: socket.socket, limits: ServerLimits, banner: str, log_level: str = "info",
          unnorm_key: str | None = None) -> None:
    """Serve `policy` on the bound `sock` until SIGINT / SIGTERM (uvicorn's graceful stop)."""
    # uvicorn logs a bare "Invalid HTTP request received." before send_400_response, which logs the reason.
    logging.getLogger("uvicorn.error").addFilter(lambda r: r.getMessage() != "Invalid HTTP request received.")
    config = uvicorn.Config(create_app(policy, limits, unnorm_key), http=make_protocol_class(limits), log_config=None,
                            log_level=log_level.lower(), backlog=limits.backlog, timeout_graceful_shutdown=5,
                            lifespan="off", ws="none")
    # uvicorn stops gracefully on SIGINT / SIGTERM, restores the previous handlers and re-raises the
    # signal; these no-op handlers make that re-raise end in a return (exit code 0), not a kill.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)
    _Server(config, banner).run(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    d = ServerLimits()
    parser = argparse.ArgumentParser(prog="python -m llava_vla_plugin.infer.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json, weights, "
                        "vla_action_tokenizer.json, dataset_statistics.json)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one, printed at start)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="weights dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20,
                        help=f"largest request body in MiB, on every path (default {d.max_body_bytes // 2**20}: "
                             "a 196 MB image, base64-encoded, fits)")
    parser.add_argument("--request-timeout", type=float, default=d.request_timeout_s,
                        help=f"seconds a client has to send a whole request (default {d.request_timeout_s:g})")
    parser.add_argument("--max-decodes", type=int, default=d.max_decodes,
                        help=f"requests decoded and predicted at once; the rest queue (default {d.max_decodes})")
    parser.add_argument("--backlog", type=int, default=d.backlog,
                        help=f"listen backlog (default {d.backlog}; Linux caps it at net.core.somaxconn)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--unnorm-key", default=None, help="dataset whose statistics un-normalize the actions of requests "
                        "that send no unnorm_key (default: none; a one-dataset checkpoint needs none)")
    parser.add_argument("--dry-run", action="store_true", help="check the arguments, the checkpoint's statistics and "
                        "--unnorm-key, print the settings; bind and load nothing")
    args = parser.parse_args(argv)
    for name in ("max_body_mb", "request_timeout", "max_decodes", "backlog"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    limits = ServerLimits(max_body_bytes=int(args.max_body_mb * 2**20), request_timeout_s=args.request_timeout,
                          max_decodes=args.max_decodes, backlog=args.backlog)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from llava_vla_plugin.core.normalization import UnnormKeyError, check_serving_statistics

    try:  # before the port is bound and any weight loads (and in --dry-run): the statistics file and the key
        stats, unnorm_key = check_serving_statistics(args.checkpoint, args.unnorm_key, key_required=False)
    except (OSError, ValueError, UnnormKeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        settings = {k: v for k, v in vars(args).items() if k != "dry_run"}
        print(json.dumps({"would_serve": settings, "datasets": sorted(stats), "unnorm_key_resolved": unnorm_key}))
        return 0
    raise_open_file_limit()
    try:
        sock = bind(args.host, args.port, args.backlog)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1

    from llava_vla_plugin.infer.pipeline import VLAPolicy

    try:
        policy = VLAPolicy.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype)
    except (OSError, ValueError) as e:
        print(f"error: cannot load {args.checkpoint}: {type(e).__name__}: {e}", file=sys.stderr)
        sock.close()
        return 1
    host, port = sock.getsockname()[:2]
    banner = (f"llava_vla_plugin.infer.serve: serving {args.checkpoint} on http://{host}:{port} "
              f"(POST /act, GET /health; datasets: {policy.dataset_names})")
    serve(policy, sock, limits, banner, args.log_level, unnorm_key)
    return 0


if __name__ == "__main__":
    code = main()
    # After the model has run in worker threads, interpreter finalization stalls ~30 s in native code
    # (no Python frame left; measured with faulthandler): everything is stopped and flushed, so leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
