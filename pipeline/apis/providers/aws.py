"""AWS Rekognition DetectLabels through boto3.

Credentials come from boto3's own chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profiles,
instance roles). botocore's retries are switched off (total_max_attempts=1): the job's
retry loop must see, and pay for, every attempt.
"""

from __future__ import annotations

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
from pipeline.apis.providers.base import Label, before_send, parse_labels
from pipeline.apis.secrets import scrub

THROTTLING_CODES = frozenset(
    {
        "ThrottlingException",
        "ProvisionedThroughputExceededException",
        "LimitExceededException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "Throttling",
        "SlowDown",
    }
)
AUTH_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "AccessDeniedException",
        "ExpiredTokenException",
        "MissingAuthenticationTokenException",
        "InvalidClientTokenId",
        "IncompleteSignature",
        "AuthFailure",
        "SignatureDoesNotMatch",
    }
)


class AwsRekognition:
    provider = "aws"
    gates_sends = True

    def __init__(self, settings: ApiSettings, timeout_s: float, pool_size: int = 10) -> None:
        import boto3
        from botocore.config import Config

        session = boto3.session.Session()
        region = settings.region or session.region_name or "us-east-1"
        config = Config(
            region_name=region,
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            max_pool_connections=max(10, pool_size),
        )
        self._client = session.client("rekognition", endpoint_url=settings.endpoint, config=config)
        # Wait for the call's rate-limit slot after botocore has built and signed the request.
        self._client.meta.events.register("before-send.rekognition", _before_send)
        self._max_labels = settings.max_labels

    def labels(self, image: bytes) -> list[Label]:
        try:
            response = self._client.detect_labels(Image={"Bytes": image}, MaxLabels=self._max_labels)
        except Exception as error:  # noqa: BLE001 - translated, scrubbed, raised from None
            raise _translate(error) from None
        return parse_labels(response.get("Labels"), "Name", "Confidence", scale=100.0, where="Labels")


def _before_send(**_: object) -> None:
    before_send()  # returns None: botocore goes on to send the request itself


def _translate(error: Exception) -> ApiError:
    from botocore import exceptions as bx
    from botocore.parsers import ResponseParserError

    message = scrub(error)
    if isinstance(error, bx.ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in THROTTLING_CODES or status == 429:
            return ThrottledError(message)
        if code in AUTH_CODES or status in (401, 403):
            return AuthError(message)
        if status >= 500 or code in ("InternalServerError", "ServiceUnavailable", "InternalFailure"):
            return ServerError(message)
        return RequestRejected(message)
    if isinstance(error, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.NoAuthTokenError)):
        return AuthError(f"no usable AWS credentials ({message}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if isinstance(error, bx.HTTPClientError):  # timeouts, refused or dropped connections
        return QueryTimeout(message)
    if isinstance(error, (ResponseParserError, ValueError)):
        return MalformedResponse(message)
    if isinstance(error, bx.NoRegionError):
        return RequestRejected(message)
    return ServerError(f"{type(error).__name__}: {message}")
