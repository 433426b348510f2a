"""An S3 server on 127.0.0.1 for the tests: moto's, in this process, with its own credentials.

`s3_server()` starts it once per test session and points every S3 client of this process
(and of the processes it starts, through the environment) at it with the standard
`AWS_ENDPOINT_URL_S3` variable, as a user would point dsmooth at a compatible store; other
AWS services (the Rekognition tests' clients) are not redirected.
"""

from __future__ import annotations

import os
import uuid

_SERVER = None
ENV = {
    "AWS_ACCESS_KEY_ID": "testing-s3-key",
    "AWS_SECRET_ACCESS_KEY": "testing-s3-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def s3_server() -> str:
    """The endpoint URL of the session's moto S3 server (started on first use)."""
    global _SERVER
    if _SERVER is None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request

        _SERVER = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        _SERVER.start()
    host, port = _SERVER.get_host_and_port()
    url = f"http://{host}:{port}"
    for key, value in ENV.items():
        os.environ.setdefault(key, value)  # any credentials do for moto
    os.environ["AWS_ENDPOINT_URL_S3"] = url
    return url


def new_bucket() -> str:
    """A fresh, empty bucket on the test server."""
    import boto3

    s3_server()
    name = f"dsmooth-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name
