"""Clarifai image prediction over its REST API (`/v2/users/U/apps/A/models/M/outputs`).

Credentials: CLARIFAI_PAT (a personal access token, sent as `Authorization: Key ...`). The
base URL is the config's endpoint, else CLARIFAI_API_BASE, else https://api.clarifai.com.
"""

from __future__ import annotations

import base64
import os
import threading

from pipeline.apis.config import ApiSettings
from pipeline.apis.errors import AuthError, MalformedResponse, RequestRejected, ThrottledError
from pipeline.apis.providers.base import Label, parse_labels
from pipeline.apis.providers.http import post

DEFAULT_BASE = "https://api.clarifai.com"
STATUS_OK = 10000
_THROTTLED = {11005}  # CONN_THROTTLED
_AUTH = set(range(11007, 11010)) | {11100, 11101, 11102}  # key invalid / not found / scopes


class ClarifaiPredict:
    provider = "clarifai"
    gates_sends = True  # through pipeline.apis.providers.http

    def __init__(self, settings: ApiSettings, timeout_s: float) -> None:
        self._pat = os.environ.get(settings.clarifai_pat_env) or ""
        if not self._pat:
            raise AuthError(f"no Clarifai token: set {settings.clarifai_pat_env}")
        base = settings.endpoint or os.environ.get("CLARIFAI_API_BASE") or DEFAULT_BASE
        path = f"/v2/users/{settings.clarifai_user}/apps/{settings.clarifai_app}/models/{settings.clarifai_model}"
        if settings.clarifai_model_version:
            path += f"/versions/{settings.clarifai_model_version}"
        self._url = base.rstrip("/") + path + "/outputs"
        self._timeout_s = timeout_s
        self._max_labels = settings.max_labels
        self._local = threading.local()

    def labels(self, image: bytes) -> list[Label]:
        headers = {"Authorization": f"Key {self._pat}", "Content-Type": "application/json"}
        payload = {"inputs": [{"data": {"image": {"base64": base64.b64encode(image).decode("ascii")}}}]}
        body = post(self._local, self._url, json=payload, headers=headers, timeout=self._timeout_s)
        if not isinstance(body, dict) or not isinstance(body.get("status"), dict):
            raise MalformedResponse("answer has no status object")
        code = body["status"].get("code")
        if code != STATUS_OK:
            description = str(body["status"].get("description", ""))[:200]
            if code in _THROTTLED:
                raise ThrottledError(f"status {code}: {description}")
            if code in _AUTH:
                raise AuthError(f"status {code}: {description}")
            raise RequestRejected(f"status {code}: {description}")
        outputs = body.get("outputs")
        if not isinstance(outputs, list) or len(outputs) != 1 or not isinstance(outputs[0], dict):
            raise MalformedResponse("expected exactly one output for one input")
        data = outputs[0].get("data")
        if not isinstance(data, dict):
            raise MalformedResponse("outputs[0] has no data object")
        return parse_labels(data.get("concepts", []), "name", "value", where="outputs[0].data.concepts")[
            : self._max_labels
        ]
