"""Label-detection clients of the four vision APIs the paper certified, behind one interface.

`make_client(settings, timeout_s)` builds the right adapter, once, when a query worker is
made (set-up, not the per-image loop); each one reads its provider's standard credential
variables itself, inside the process that queries, so credentials never travel through
configs, Ray task arguments or logs. What every adapter returns and the rules they share are
in `base`.
"""

from __future__ import annotations

from pipeline.apis.config import ApiSettings
from pipeline.apis.providers.base import LabelClient


def make_client(settings: ApiSettings, timeout_s: float, pool_size: int = 10) -> LabelClient:
    """A client for `settings.provider`; raises AuthError when credentials are missing."""
    if settings.provider == "aws":
        from pipeline.apis.providers.aws import AwsRekognition

        return AwsRekognition(settings, timeout_s, pool_size)
    if settings.provider == "google":
        from pipeline.apis.providers.google import GoogleVision

        return GoogleVision(settings, timeout_s)
    if settings.provider == "azure":
        from pipeline.apis.providers.azure import AzureVision

        return AzureVision(settings, timeout_s)
    if settings.provider == "clarifai":
        from pipeline.apis.providers.clarifai import ClarifaiPredict

        return ClarifaiPredict(settings, timeout_s)
    if settings.provider == "openai":
        from pipeline.apis.providers.openai_chat import OpenAIChat

        return OpenAIChat(settings, timeout_s, pool_size)
    raise ValueError(f"unknown provider {settings.provider!r}")

