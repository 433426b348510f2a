"""Azure AI Vision image tags, Image Analysis 4.0 REST (`imageanalysis:analyze?features=tags`).

Credentials: VISION_KEY (the `Ocp-Apim-Subscription-Key`) and VISION_ENDPOINT, the names
used by Microsoft's own samples; the config's `endpoint` overrides VISION_ENDPOINT.
"""

from __future__ import annotations

import os
import threading

from pipeline.apis.config import ApiSettings
from pipeline.apis.errors import AuthError, MalformedResponse, RequestRejected
from pipeline.apis.providers.base import Label, parse_labels
from pipeline.apis.providers.http import post


class AzureVision:
    provider = "azure"
    gates_sends = True  # through pipeline.apis.providers.http

    def __init__(self, settings: ApiSettings, timeout_s: float) -> None:
        self._key = os.environ.get(settings.azure_key_env) or ""
        if not self._key:
            raise AuthError(f"no Azure key: set {settings.azure_key_env} (and {settings.azure_endpoint_env})")
        endpoint = settings.endpoint or os.environ.get(settings.azure_endpoint_env) or ""
        if not endpoint:
            raise RequestRejected(f"no Azure endpoint: set {settings.azure_endpoint_env} or api.endpoint")
        self._url = endpoint.rstrip("/") + "/computervision/imageanalysis:analyze"
        self._params = {"api-version": settings.azure_api_version, "features": "tags", "language": "en"}
        self._timeout_s = timeout_s
        self._max_labels = settings.max_labels
        self._local = threading.local()

    def labels(self, image: bytes) -> list[Label]:
        headers = {"Ocp-Apim-Subscription-Key": self._key, "Content-Type": "application/octet-stream"}
        body = post(self._local, self._url, params=self._params, data=image, headers=headers, timeout=self._timeout_s)
        result = body.get("tagsResult") if isinstance(body, dict) else None
        if not isinstance(result, dict):
            raise MalformedResponse("answer has no tagsResult object")
        return parse_labels(result.get("values"), "name", "confidence", where="tagsResult.values")[: self._max_labels]
