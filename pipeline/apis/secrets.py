"""Keep credentials out of every message, log line and file the job writes.

Client libraries echo request details in their errors (botocore can quote headers,
google-api-core the request URL with `?key=`), so every error text crosses `scrub` before
it is stored or printed: first the literal values of the credential variables in the
environment, then header- and URL-shaped patterns whatever their value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

REDACTED = "***"

# Standard variables of the four providers (and of boto3's chain) that hold secrets.
SECRET_ENV_VARS: tuple[str, ...] = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "GOOGLE_API_KEY",
    "VISION_KEY",
    "AZURE_VISION_KEY",
    "CLARIFAI_PAT",
    "CLARIFAI_API_KEY",
)

_PATTERNS: tuple[re.Pattern[str], ...] = (
    # Header-like "Name: value" / "name=value" / "'name': 'value'" up to the end of the value.
    re.compile(
        r"(?i)(\b(?:authorization|x-goog-api-key|ocp-apim-subscription-key|x-amz-security-token|"
        r"x-api-key|api[-_]?key|access[-_]?key(?:[-_]?id)?|secret[-_]?access[-_]?key|"
        r"session[-_]?token|signature|credential|pat)['\"]?\s*[:=]\s*['\"]?)"
        r"(?:(?:Key|Bearer|Basic|AWS4-HMAC-SHA256)\s+)?[^'\"\s,;&}]+"
    ),
    re.compile(r"(?i)([?&](?:key|api_key|access_token|token)=)[^&\s'\"]+"),
    re.compile(r"(?i)(\b(?:Key|Bearer)\s+)[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{12,}\b"),  # AWS access key ids anywhere
)


def secret_values(names: Iterable[str] = SECRET_ENV_VARS, extra: Iterable[str] = ()) -> list[str]:
    """Current values of the credential variables (longest first, so substrings go last)."""
    values = {os.environ.get(name, "") for name in names} | set(extra)
    return sorted((v for v in values if v and len(v) >= 4), key=len, reverse=True)


def scrub(text: object, secrets: Iterable[str] | None = None) -> str:
    """`text` as a string with credential values and credential-shaped fields redacted."""
    result = str(text)
    for value in secret_values() if secrets is None else secrets:
        result = result.replace(value, REDACTED)
    for pattern in _PATTERNS:
        if pattern.groups:
            result = pattern.sub(lambda m: m.group(1) + REDACTED, result)
        else:
            result = pattern.sub(REDACTED, result)
    return result


def describe(error: BaseException, limit: int = 500) -> str:
    """`Type: message`, scrubbed and shortened: the form errors take in logs and Parquet."""
    message = " ".join(scrub(error).split())
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
