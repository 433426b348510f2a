"""Each provider's wire format, as far as label detection and its errors go.

Close enough that the real client libraries (boto3, google-cloud-vision over REST, and the
REST calls of the Azure and Clarifai adapters) accept the answers and map the errors to
their usual exception types: JSON shapes, status codes, error codes and content types
follow the providers' API references.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

Labels = list[tuple[str, float]]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


class BadRequest(Exception):
    """The request itself is wrong (no image, undecodable JSON): a provider-style 400."""


def _json(status: int, payload: Any, content_type: str = "application/json", **headers: str) -> Response:
    return Response(status, json.dumps(payload).encode(), {"Content-Type": content_type, **headers})


def _b64(text: Any, what: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise BadRequest(f"{what} is missing")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} is not valid base64") from None


def _load_json(body: bytes) -> Any:
    try:
        return json.loads(body or b"{}")
    except ValueError:
        raise BadRequest("request body is not valid JSON") from None


MALFORMED_BODY = b'{"truncated": [{"name": "Sky", "sco'


class Protocol:
    name = ""

    def matches(self, request: Request) -> bool:
        raise NotImplementedError

    def has_credentials(self, request: Request) -> bool:
        raise NotImplementedError

    def image(self, request: Request) -> tuple[bytes, dict[str, Any]]:
        """The encoded image and the options that shape the answer (max labels...)."""
        raise NotImplementedError

    def presented(self, request: Request) -> str:
        """The credential the client sent. Auth errors echo it, as some real services do
        (AWS quotes the Authorization header in IncompleteSignature errors): clients must
        scrub error texts, and the tests check that they do."""
        return request.headers.get("authorization", "")

    def answer(self, labels: Labels, options: dict[str, Any], size: tuple[int, int]) -> Response:
        raise NotImplementedError

    def error(self, kind: str, message: str = "", retry_after_s: float = 0.0) -> Response:
        """kind: auth_failure | missing_credentials | throttle | server_error | bad_request."""
        raise NotImplementedError

    def malformed(self) -> Response:
        return Response(200, MALFORMED_BODY, {"Content-Type": "application/json"})


class AwsRekognition(Protocol):
    """JSON 1.1 protocol: POST / with X-Amz-Target, SigV4 Authorization header."""

    name = "aws"
    TARGET = "RekognitionService.DetectLabels"
    CONTENT_TYPE = "application/x-amz-json-1.1"

    def matches(self, request: Request) -> bool:
        return request.method == "POST" and request.headers.get("x-amz-target", "").startswith("RekognitionService.")

    def has_credentials(self, request: Request) -> bool:
        return request.headers.get("authorization", "").startswith("AWS4-HMAC-SHA256 Credential=")

    def image(self, request: Request) -> tuple[bytes, dict[str, Any]]:
        if request.headers.get("x-amz-target") != self.TARGET:
            raise BadRequest(f"operation {request.headers.get('x-amz-target')!r} is not emulated")
        payload = _load_json(request.body)
        image = payload.get("Image") if isinstance(payload, dict) else None
        if not isinstance(image, dict):
            raise BadRequest("Image is required")
        options = {"max": payload.get("MaxLabels", 1000), "min_score": float(payload.get("MinConfidence", 0.0)) / 100}
        return _b64(image.get("Bytes"), "Image.Bytes"), options

    def answer(self, labels: Labels, options: dict[str, Any], size: tuple[int, int]) -> Response:
        kept = [(n, s) for n, s in labels if s >= options["min_score"]][: int(options["max"])]
        body = {
            "Labels": [
                {"Name": n, "Confidence": round(s * 100, 4), "Instances": [], "Parents": [], "Aliases": [],
                 "Categories": []}
                for n, s in kept
            ],
            "LabelModelVersion": "3.0",
        }
        return _json(200, body, self.CONTENT_TYPE, **{"x-amzn-RequestId": str(uuid.uuid4())})

    def error(self, kind: str, message: str = "", retry_after_s: float = 0.0) -> Response:
        status, code, text = {
            "auth_failure": (400, "UnrecognizedClientException",
                             f"The security token included in the request is invalid. Authorization={message}"),
            "missing_credentials": (400, "MissingAuthenticationTokenException", "Missing Authentication Token"),
            "throttle": (400, "ThrottlingException", "Rate exceeded"),
            "server_error": (500, "InternalServerError", "Internal server error"),
            "bad_request": (400, "InvalidParameterException", message or "Request has invalid parameters"),
            "bad_image": (400, "InvalidImageFormatException", "Request has unsupported image format"),
        }[kind]
        return _json(status, {"__type": code, "message": text}, self.CONTENT_TYPE,
                     **{"x-amzn-RequestId": str(uuid.uuid4()), "x-amzn-ErrorType": f"{code}:"})


class GoogleVision(Protocol):
    """Cloud Vision v1 REST: POST /v1/images:annotate, key in x-goog-api-key or ?key=."""

    name = "google"
    _PATH = re.compile(r"^/v1/(?:projects/[^/]+/(?:locations/[^/]+/)?)?images:annotate$")

    def matches(self, request: Request) -> bool:
        return request.method == "POST" and bool(self._PATH.match(request.path))

    def presented(self, request: Request) -> str:
        return request.headers.get("x-goog-api-key") or request.query.get("key") or super().presented(request)

    def has_credentials(self, request: Request) -> bool:
        return bool(
            request.headers.get("x-goog-api-key")
            or request.query.get("key")
            or request.headers.get("authorization", "").startswith("Bearer ")
        )

    def image(self, request: Request) -> tuple[bytes, dict[str, Any]]:
        payload = _load_json(request.body)
        requests = payload.get("requests") if isinstance(payload, dict) else None
        if not isinstance(requests, list) or len(requests) != 1 or not isinstance(requests[0], dict):
            raise BadRequest("the emulator answers exactly one request per call")
        first = requests[0]
        features = first.get("features") or []
        wanted = [f for f in features if isinstance(f, dict) and f.get("type") in ("LABEL_DETECTION", 4, "4")]
        if not wanted:
            raise BadRequest("only LABEL_DETECTION is emulated")
        image = first.get("image") if isinstance(first.get("image"), dict) else {}
        return _b64(image.get("content"), "requests[0].image.content"), {"max": int(wanted[0].get("maxResults", 10))}

    def answer(self, labels: Labels, options: dict[str, Any], size: tuple[int, int]) -> Response:
        annotations = [
            {"mid": f"/m/emu{zlib.crc32(n.encode()) % 10**6:06d}", "description": n, "score": s, "topicality": s}
            for n, s in labels[: options["max"]]
        ]
        return _json(200, {"responses": [{"labelAnnotations": annotations}]})

    def error(self, kind: str, message: str = "", retry_after_s: float = 0.0) -> Response:
        if kind == "auth_failure":  # what Google answers for a wrong API key
            details = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com", "metadata": {"service": "vision.googleapis.com"}}]
            return _json(400, {"error": {"code": 400, "message": f"API key not valid. Please pass a valid API key. ({message})",
                                         "status": "INVALID_ARGUMENT", "details": details}})
        status, state, text = {
            "missing_credentials": (403, "PERMISSION_DENIED", "The request is missing a valid API key."),
            "throttle": (429, "RESOURCE_EXHAUSTED", "Quota exceeded for quota metric 'Requests'."),
            "server_error": (503, "UNAVAILABLE", "The service is currently unavailable."),
            "bad_request": (400, "INVALID_ARGUMENT", message or "Invalid request."),
            "bad_image": (400, "INVALID_ARGUMENT", "Bad image data."),
        }[kind]
        return _json(status, {"error": {"code": status, "message": text, "status": state}})


class AzureVision(Protocol):
    """Image Analysis 4.0: POST /computervision/imageanalysis:analyze?features=tags."""

    name = "azure"
    PATH = "/computervision/imageanalysis:analyze"

    def matches(self, request: Request) -> bool:
        return request.method == "POST" and request.path == self.PATH

    def presented(self, request: Request) -> str:
        return request.headers.get("ocp-apim-subscription-key") or super().presented(request)

    def has_credentials(self, request: Request) -> bool:
        return bool(request.headers.get("ocp-apim-subscription-key")
                    or request.headers.get("authorization", "").startswith("Bearer "))

    def image(self, request: Request) -> tuple[bytes, dict[str, Any]]:
        features = {f.strip().lower() for f in request.query.get("features", "").split(",")}
        if "tags" not in features:
            raise BadRequest("only features=tags is emulated")
        if not request.query.get("api-version"):
            raise BadRequest("api-version is required")
        if not request.headers.get("content-type", "").startswith("application/octet-stream"):
            raise BadRequest("send the image as application/octet-stream")
        if not request.body:
            raise BadRequest("image data is empty")
        return request.body, {"api_version": request.query["api-version"]}

    def answer(self, labels: Labels, options: dict[str, Any], size: tuple[int, int]) -> Response:
        body = {
            "modelVersion": options["api_version"],
            "metadata": {"width": size[0], "height": size[1]},
            "tagsResult": {"values": [{"name": n.lower(), "confidence": s} for n, s in labels]},
        }
        return _json(200, body, **{"apim-request-id": str(uuid.uuid4())})

    def error(self, kind: str, message: str = "", retry_after_s: float = 0.0) -> Response:
        status, code, text = {
            "auth_failure": (401, "401", f"Access denied due to invalid subscription key {message} or wrong API endpoint."),
            "missing_credentials": (401, "401", "Access denied due to missing subscription key."),
            "throttle": (429, "429", "Rate limit is exceeded. Try again later."),
            "server_error": (500, "InternalServerError", "An unexpected error occurred."),
            "bad_request": (400, "InvalidRequest", message or "Invalid request."),
            "bad_image": (400, "InvalidImageFormat", "Input data is not a valid image."),
        }[kind]
        headers = {"Retry-After": f"{retry_after_s:g}"} if kind == "throttle" and retry_after_s > 0 else {}
        return _json(status, {"error": {"code": code, "message": text}}, **headers)


class Clarifai(Protocol):
    """Clarifai v2: POST /v2/[users/U/apps/A/]models/M[/versions/V]/outputs, `Key` auth."""

    name = "clarifai"
    _PATH = re.compile(r"^/v2/(?:users/[^/]+/apps/[^/]+/)?models/[^/]+(?:/versions/[^/]+)?/outputs$")

    def matches(self, request: Request) -> bool:
        return request.method == "POST" and bool(self._PATH.match(request.path))

    def has_credentials(self, request: Request) -> bool:
        return request.headers.get("authorization", "").startswith("Key ")

    def image(self, request: Request) -> tuple[bytes, dict[str, Any]]:
        payload = _load_json(request.body)
        inputs = payload.get("inputs") if isinstance(payload, dict) else None
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise BadRequest("the emulator answers exactly one input per call")
        image = ((inputs[0].get("data") or {}).get("image") or {}) if isinstance(inputs[0].get("data"), dict) else {}
        model = request.path.split("/models/")[1].split("/")[0]
        return _b64(image.get("base64"), "inputs[0].data.image.base64"), {"model": model}

    def answer(self, labels: Labels, options: dict[str, Any], size: tuple[int, int]) -> Response:
        ok = {"code": 10000, "description": "Ok"}
        concepts = [{"id": f"ai_{zlib.crc32(n.encode()) % 10**8:08d}", "name": n.lower(), "value": s, "app_id": "main"}
                    for n, s in labels]
        output = {"id": uuid.uuid4().hex, "status": ok, "model": {"id": options["model"]},
                  "data": {"concepts": concepts}}
        return _json(200, {"status": {**ok, "req_id": uuid.uuid4().hex}, "outputs": [output]})

    def error(self, kind: str, message: str = "", retry_after_s: float = 0.0) -> Response:
        status, code, text = {
            "auth_failure": (401, 11009, f"API key not found: {message}"),
            "missing_credentials": (401, 11102, "Invalid request: no Authorization header"),
            "throttle": (429, 11005, "Making too many requests"),
            "server_error": (500, 98004, "Internal error"),
            "bad_request": (400, 11102, message or "Invalid request"),
            "bad_image": (400, 30002, "Input image is not valid"),
        }[kind]
        return _json(status, {"status": {"code": code, "description": text}})

