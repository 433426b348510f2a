"""Google Cloud Vision label detection through google-cloud-vision (REST transport).

The REST transport is used because it honours an `http://` endpoint override (the emulator)
as well as the real https endpoint. Credentials: an API key from the variable named by
`google_api_key_env` (GOOGLE_API_KEY) when set, otherwise google.auth.default()
(GOOGLE_APPLICATION_CREDENTIALS, gcloud's application-default credentials...). The
library's own retries are disabled (retry=None) so every attempt is the job's, and counted.
"""

from __future__ import annotations

import os

from pipeline.apis.config import ApiSettings
from pipeline.apis.errors import (
    ApiError,
    AuthError,
    MalformedResponse,
    QueryTimeout,
    RequestRejected,
    ServerError,
    ThrottledError,
)
from pipeline.apis.providers.base import Label
from pipeline.apis.providers.http import gate_sends
from pipeline.apis.secrets import scrub

# google.rpc.Code values that may appear in a per-image `error` of a 200 answer.
_RPC_THROTTLED = {8}  # RESOURCE_EXHAUSTED
_RPC_AUTH = {7, 16}  # PERMISSION_DENIED, UNAUTHENTICATED
_RPC_TRANSIENT = {4, 10, 13, 14}  # DEADLINE_EXCEEDED, ABORTED, INTERNAL, UNAVAILABLE
# ErrorInfo reasons Google gives (with HTTP 400) for keys that are wrong or not allowed.
_AUTH_REASONS = {"API_KEY_INVALID", "API_KEY_SERVICE_BLOCKED", "API_KEY_HTTP_REFERRER_BLOCKED", "API_KEY_IP_ADDRESS_BLOCKED"}


class GoogleVision:
    provider = "google"
    gates_sends = False  # True once the session is gated (__init__)

    def __init__(self, settings: ApiSettings, timeout_s: float) -> None:
        from google.api_core.client_options import ClientOptions
        from google.cloud import vision

        api_key = os.environ.get(settings.google_api_key_env) or None
        options = ClientOptions(api_endpoint=settings.endpoint, api_key=api_key)
        try:
            self._client = vision.ImageAnnotatorClient(transport="rest", client_options=options)
        except Exception as error:  # noqa: BLE001 - DefaultCredentialsError and friends
            raise AuthError(
                f"no usable Google credentials ({scrub(error)}); set {settings.google_api_key_env} "
                "or GOOGLE_APPLICATION_CREDENTIALS"
            ) from None
        # Wait for the call's rate-limit slot after the request is built: through the REST
        # transport's requests session where this version has one, else before the call.
        session = getattr(getattr(self._client, "_transport", None), "_session", None)
        if session is not None and hasattr(session, "mount"):
            gate_sends(session)
            self.gates_sends = True
        self._vision = vision
        self._timeout_s = timeout_s
        self._max_labels = settings.max_labels

    def labels(self, image: bytes) -> list[Label]:
        vision = self._vision
        request = vision.AnnotateImageRequest(
            image=vision.Image(content=image),
            features=[vision.Feature(type_=vision.Feature.Type.LABEL_DETECTION, max_results=self._max_labels)],
        )
        try:
            response = self._client.batch_annotate_images(requests=[request], retry=None, timeout=self._timeout_s)
        except Exception as error:  # noqa: BLE001 - translated, scrubbed, raised from None
            raise _translate(error) from None
        if len(response.responses) != 1:
            raise MalformedResponse(f"expected 1 response for 1 image, got {len(response.responses)}")
        answer = response.responses[0]
        if answer.error.code:
            raise _rpc_error(answer.error.code, answer.error.message)
        labels = []
        for i, annotation in enumerate(answer.label_annotations):
            if not annotation.description:
                raise MalformedResponse(f"labelAnnotations[{i}] has no description")
            labels.append(Label(annotation.description, float(annotation.score)))
        return labels


def _rpc_error(code: int, message: str) -> ApiError:
    text = f"rpc code {code}: {scrub(message)[:300]}"
    if code in _RPC_THROTTLED:
        return ThrottledError(text)
    if code in _RPC_AUTH:
        return AuthError(text)
    if code in _RPC_TRANSIENT:
        return ServerError(text)
    return RequestRejected(text)


def _translate(error: Exception) -> ApiError:
    import requests
    from google.api_core import exceptions as gx
    from google.auth import exceptions as auth_exceptions
    from google.protobuf.json_format import ParseError

    message = f"{type(error).__name__}: {scrub(error)}"
    if isinstance(error, (gx.TooManyRequests, gx.ResourceExhausted)):
        return ThrottledError(message)
    if getattr(error, "reason", None) in _AUTH_REASONS or "API key not valid" in message:
        return AuthError(message)
    if isinstance(error, (gx.Unauthenticated, gx.PermissionDenied, gx.Unauthorized, gx.Forbidden)):
        return AuthError(message)
    if isinstance(error, auth_exceptions.GoogleAuthError):
        return AuthError(message)
    if isinstance(error, (gx.DeadlineExceeded, gx.GatewayTimeout, gx.RetryError)):
        return QueryTimeout(message)
    if isinstance(error, (gx.ServerError, gx.ServiceUnavailable)):
        return ServerError(message)
    if isinstance(error, gx.GoogleAPICallError):
        return RequestRejected(message)
    if isinstance(error, (requests.Timeout, requests.ConnectionError)):
        return QueryTimeout(message)
    if isinstance(error, (ParseError, ValueError)):
        return MalformedResponse(message)
    return ServerError(message)
