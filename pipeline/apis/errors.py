"""What can go wrong with one API query, sorted by what the caller must do about it.

Provider adapters translate their library's exceptions into these classes, with messages
already scrubbed of secrets, so the retry loop and the job never look at botocore or
google-api-core types and never hold an unscrubbed error text.
"""

from __future__ import annotations


class ApiError(Exception):
    """Base class; `str(error)` is safe to log (secrets removed). `kind` is the status the
    failed call is journaled with (the two families below are no status of their own)."""

    kind = "error"


class TransientError(ApiError):
    """Worth retrying after a back-off: the same query may well succeed later."""


class ThrottledError(TransientError):
    """429 / ThrottlingException / RESOURCE_EXHAUSTED: slow down and retry."""

    kind = "throttled"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServerError(TransientError):
    """5xx from the provider."""

    kind = "server_error"


class QueryTimeout(TransientError):
    """No answer in time, or the connection dropped."""

    kind = "timeout"


class FatalError(ApiError):
    """Every further query would fail the same way: stop the whole job at once."""


class AuthError(FatalError):
    """Missing, invalid or unauthorised credentials (401/403, UnrecognizedClient...)."""

    kind = "auth"


class RequestRejected(FatalError):
    """A non-retryable 4xx (bad endpoint, model id, region...): a configuration problem."""

    kind = "rejected"


class MalformedResponse(ApiError):
    """The provider answered, but not with a label list we can read.

    Recorded as a failed query (it counts against the top class), never as a label and
    never retried: the answer was given and paid for.
    """

    kind = "malformed"
