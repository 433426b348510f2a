"""One POST with `requests` for the REST adapters: statuses and transport errors to ApiError."""

from __future__ import annotations

import json as jsonlib
import threading
from typing import Any

from pipeline.apis.errors import MalformedResponse, QueryTimeout
from pipeline.apis.providers.base import before_send, error_for_status
from pipeline.apis.secrets import scrub


def _session(local: threading.local) -> Any:
    """A requests.Session per thread (sessions are not documented as thread-safe)."""
    import requests

    session = getattr(local, "session", None)
    if session is None:
        session = local.session = gate_sends(requests.Session())
    return session


def gate_sends(session: Any) -> Any:
    """Make `session` wait for the call's rate-limit slot just before each request leaves,
    after the request is built (pipeline.apis.providers.base.before_send)."""
    from requests.adapters import HTTPAdapter

    class GatedAdapter(HTTPAdapter):
        def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
            before_send()
            return super().send(request, *args, **kwargs)

    for prefix in ("https://", "http://"):
        session.mount(prefix, GatedAdapter())
    return session


def post(local: threading.local, url: str, timeout: float, **kwargs: Any) -> Any:
    """POST and return the decoded JSON body of a 2xx answer; raise ApiError otherwise."""
    import requests

    try:
        response = _session(local).post(url, timeout=timeout, **kwargs)
    except (requests.Timeout, requests.ConnectionError) as error:
        raise QueryTimeout(f"{type(error).__name__}: {scrub(error)}") from None
    except requests.RequestException as error:
        raise QueryTimeout(f"{type(error).__name__}: {scrub(error)}") from None
    if not 200 <= response.status_code < 300:
        raise error_for_status(response.status_code, response.text, response.headers.get("Retry-After"))
    try:
        return jsonlib.loads(response.content)
    except ValueError:
        raise MalformedResponse(f"HTTP {response.status_code} body is not JSON ({len(response.content)} bytes)") from None
