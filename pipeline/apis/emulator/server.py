"""A local HTTP server that answers label-detection calls of all four providers, and chat
completions of an OpenAI-compatible vision-language model (`/v1/chat/completions`).

One port serves every provider (requests are told apart by path and headers, as the real
endpoints are), so a test points boto3, google-cloud-vision and the REST adapters at the
same `http://127.0.0.1:PORT`. It never binds anything but 127.0.0.1. Control endpoints
under `/_emulator/` (not counted as calls) read the call counters and switch faults:

    GET  /_emulator/calls     {"aws": 12, "google": 0, ..., "openai": 0, "total": 12}
    GET  /_emulator/stats     calls, most requests in flight at once, most calls in any second,
                              calls repeating an earlier request, fault settings
    POST /_emulator/faults    {"provider": "aws", "throttle": 0.3, ...}  (provider optional)
    POST /_emulator/reset     zero the counters and clear every fault

Nothing a client sends is logged (headers carry keys).
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.apis.emulator.classifier import Classifier, ColourClassifier
from pipeline.apis.emulator.faults import FaultInjector, FaultSettings
from pipeline.apis.emulator.openai_chat import OpenAIChat
from pipeline.apis.emulator.protocols import (
    AwsRekognition,
    AzureVision,
    BadRequest,
    Clarifai,
    GoogleVision,
    Protocol,
    Request,
    Response,
)

# Every wire format the emulator speaks: the four label APIs and OpenAI-compatible chat.
PROTOCOLS: tuple[Protocol, ...] = (AwsRekognition(), GoogleVision(), AzureVision(), Clarifai(), OpenAIChat())

HOST = "127.0.0.1"
CONTROL_PREFIX = "/_emulator/"
MAX_BODY = 20 * 1024 * 1024


class EmulatorServer:
    """The emulator as a Python object: `start()` serves in a background thread."""

    def __init__(self, classifier: Classifier | None = None, port: int = 0, seed: int = 0,
                 faults: FaultSettings | None = None, verbose: bool = False) -> None:
        self.classifier = classifier or ColourClassifier()
        self.faults = FaultInjector(seed)
        if faults is not None:
            self.faults.set(faults)
        self.verbose = verbose
        self._lock = threading.Lock()
        self._calls = {p.name: 0 for p in PROTOCOLS}
        self._starts: dict[str, list[float]] = {p.name: [] for p in PROTOCOLS}  # arrival times (time.time)
        self._bodies: dict[str, dict[str, int]] = {p.name: {} for p in PROTOCOLS}  # request digest -> count
        self._in_flight = {p.name: 0 for p in PROTOCOLS}
        self._max_in_flight = {p.name: 0 for p in PROTOCOLS}
        self._httpd = ThreadingHTTPServer((HOST, port), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> EmulatorServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="api-emulator", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the Python control API ------------------------------------------------------------

    def set_faults(self, provider: str | None = None, **settings: Any) -> None:
        """E.g. set_faults(throttle=0.3) for all providers, set_faults("aws", auth_failure=True)."""
        self.faults.set(FaultSettings.from_dict(settings), provider)

    def calls(self, provider: str | None = None) -> int | dict[str, int]:
        with self._lock:
            return dict(self._calls) if provider is None else self._calls[provider]

    def starts(self, provider: str) -> list[float]:
        """Arrival times (time.time()) of every call of `provider`, in order."""
        with self._lock:
            return list(self._starts[provider])

    def max_in_window(self, provider: str, window_s: float = 1.0) -> int:
        """The most calls of `provider` that arrived within any `window_s` seconds."""
        return max_in_window(self.starts(provider), window_s)

    def repeated(self, provider: str) -> int:
        """Calls whose request (the same encoded image) had been sent before: the same query
        asked again (a retry after an error, or a repeat after a crash)."""
        with self._lock:
            return sum(n - 1 for n in self._bodies[provider].values())

    def stats(self) -> dict[str, Any]:
        names = [p.name for p in PROTOCOLS]
        windows = {name: self.max_in_window(name) for name in names}
        repeats = {name: self.repeated(name) for name in names}
        with self._lock:
            calls = dict(self._calls)
            return {
                "calls": {**calls, "total": sum(calls.values())},
                "max_in_flight": dict(self._max_in_flight),
                "max_calls_in_a_second": windows,
                "repeated": repeats,
                "faults": {p.name: self.faults.settings(p.name).to_dict() for p in PROTOCOLS},
            }

    def reset(self) -> None:
        with self._lock:
            for name in self._calls:
                self._calls[name] = 0
                self._max_in_flight[name] = 0
                self._starts[name] = []
                self._bodies[name] = {}
        self.faults.set(FaultSettings())

    # -- serving a provider call -----------------------------------------------------------

    def handle(self, request: Request, arrived: float | None = None) -> Response:
        """Answer one request; `arrived` is when its first line came in (the metering time)."""
        if request.path.startswith(CONTROL_PREFIX):
            return self._control(request)
        protocol = next((p for p in PROTOCOLS if p.matches(request)), None)
        if protocol is None:
            return Response(404, b'{"error": "no emulated API at this path"}', {"Content-Type": "application/json"})
        digest = hashlib.sha256(request.body).hexdigest()
        with self._lock:
            self._calls[protocol.name] += 1
            self._starts[protocol.name].append(arrived if arrived is not None else time.time())
            self._bodies[protocol.name][digest] = self._bodies[protocol.name].get(digest, 0) + 1
            self._in_flight[protocol.name] += 1
            self._max_in_flight[protocol.name] = max(self._max_in_flight[protocol.name], self._in_flight[protocol.name])
        try:
            return self._answer(protocol, request)
        finally:
            with self._lock:
                self._in_flight[protocol.name] -= 1

    def _answer(self, protocol: Protocol, request: Request) -> Response:
        fault, delay = self.faults.draw(protocol.name)
        if delay:
            time.sleep(delay)
        if not protocol.has_credentials(request):
            return protocol.error("missing_credentials")
        if fault == "auth_failure":
            return protocol.error("auth_failure", protocol.presented(request))
        if fault == "throttle":
            return protocol.error("throttle", retry_after_s=self.faults.settings(protocol.name).retry_after_s)
        if fault == "server_error":
            return protocol.error("server_error")
        try:
            encoded, options = protocol.image(request)
        except BadRequest as error:
            return protocol.error("bad_request", str(error))
        try:
            with Image.open(io.BytesIO(encoded)) as image:
                rgb = np.asarray(image.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            return protocol.error("bad_image")
        if fault == "malformed":
            return protocol.malformed()
        if fault in ("refusal", "garbage") and hasattr(protocol, "answer_fault"):  # chat models only
            return protocol.answer_fault(fault, options, (rgb.shape[1], rgb.shape[0]))
        labels = self.classifier.labels(rgb)
        return protocol.answer(labels, options, (rgb.shape[1], rgb.shape[0]))

    def _control(self, request: Request) -> Response:
        action = request.path[len(CONTROL_PREFIX):]
        try:
            if request.method == "GET" and action == "calls":
                payload: Any = self.stats()["calls"]
            elif request.method == "GET" and action == "stats":
                payload = self.stats()
            elif request.method == "POST" and action == "reset":
                self.reset()
                payload = {"ok": True}
            elif request.method == "POST" and action == "faults":
                settings = json.loads(request.body or b"{}")
                if not isinstance(settings, dict):
                    raise ValueError("send a JSON object of fault settings")
                provider = settings.pop("provider", None)
                if provider is not None and provider not in self._calls:
                    raise ValueError(f"unknown provider {provider!r} (known: {', '.join(self._calls)})")
                self.set_faults(provider, **settings)
                payload = {"ok": True}
            else:
                return Response(404, b'{"error": "unknown control action"}', {"Content-Type": "application/json"})
        except (ValueError, TypeError) as error:
            return Response(400, json.dumps({"error": str(error)}).encode(), {"Content-Type": "application/json"})
        return Response(200, json.dumps(payload).encode(), {"Content-Type": "application/json"})


def max_in_window(times: list[float], window_s: float = 1.0) -> int:
    """The most of `times` (seconds) within any `window_s` seconds: a rate limit holds when
    this is at most its calls per window."""
    times = sorted(times)
    best, first = 0, 0
    for last, time_ in enumerate(times):
        while time_ - times[first] >= window_s:
            first += 1
        best = max(best, last - first + 1)
    return best


def _handler_for(server: EmulatorServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the real endpoints
        server_version = "dsmooth-api-emulator"

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def parse_request(self) -> bool:
            self._arrived = time.time()  # as a provider meters: when the request line came in
            return super().parse_request()

        def _serve(self) -> None:
            arrived = getattr(self, "_arrived", time.time())
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self.send_error(413)
                return
            body = self.rfile.read(length) if length else b""
            parts = urlsplit(self.path)
            request = Request(
                method=self.command,
                path=parts.path,
                query=dict(parse_qsl(parts.query)),
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
            )
            try:
                response = server.handle(request, arrived)
            except Exception as error:  # noqa: BLE001 - an emulator bug must not kill the thread
                response = Response(500, json.dumps({"error": type(error).__name__}).encode(),
                                    {"Content-Type": "application/json"})
            try:
                self.send_response(response.status)
                for name, value in response.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(response.body)))
                self.end_headers()
                self.wfile.write(response.body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (its timeout): nothing to answer

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            if server.verbose:  # method and path only: never headers or query strings
                print(f"api-emulator: {self.command} {urlsplit(self.path).path}", file=sys.stderr, flush=True)

    return Handler
