"""The `certify-api` job's YAML config, validated before a single (paid) query is sent.

Secrets never appear here: the config names *which* environment variables hold them, so
the config (and run.json, built from it) can be shared and committed safely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.config import ConfigError

Provider = Literal["aws", "google", "azure", "clarifai"]
PROVIDERS: tuple[str, ...] = ("aws", "google", "azure", "clarifai")

# List prices in USD per 1,000 label-detection calls (first pricing tier, as published by
# each provider); only used to account spending against `budget.max_cost`.
DEFAULT_PRICES_PER_1000: dict[str, float] = {"aws": 1.00, "google": 1.50, "azure": 1.00, "clarifai": 1.20}


@dataclass
class ApiSettings:
    """Which API, and how to reach it. `endpoint` overrides the provider's real endpoint
    (an emulator on 127.0.0.1, a proxy, a regional endpoint)."""

    provider: Provider
    endpoint: str | None = None
    max_labels: int = 10  # labels asked for per query; the class is the top one
    region: str | None = None  # aws: default from boto3's chain (AWS_REGION...), else us-east-1
    google_api_key_env: str = "GOOGLE_API_KEY"  # unset variable -> google.auth.default()
    azure_key_env: str = "VISION_KEY"
    azure_endpoint_env: str = "VISION_ENDPOINT"
    azure_api_version: str = "2023-10-01"
    clarifai_pat_env: str = "CLARIFAI_PAT"
    clarifai_user: str = "clarifai"
    clarifai_app: str = "main"
    clarifai_model: str = "general-image-recognition"
    clarifai_model_version: str | None = None

    def validate(self) -> None:
        if self.max_labels < 1:
            raise ConfigError("max_labels", f"must be at least 1, got {self.max_labels}")
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError("endpoint", f"must start with http:// or https://, got {self.endpoint!r}")

    def answer_identity(self) -> dict:
        """Settings that change what the API answers (part of the run's identity)."""
        identity: dict = {"provider": self.provider}
        if self.provider == "azure":
            identity["azure_api_version"] = self.azure_api_version
        if self.provider == "clarifai":
            identity["clarifai_model"] = "/".join(
                [self.clarifai_user, self.clarifai_app, self.clarifai_model, self.clarifai_model_version or "latest"]
            )
        return identity


@dataclass
class DataSettings:
    """Images to certify: any `open_dataset` kind, sliced with skip/max or explicit ids."""

    root: Path
    kind: Literal["folder", "imagenet", "cifar10"] = "folder"
    split: str = "test"
    image_size: int | None = None
    skip: int = 1
    max: int | None = None
    ids: list[int] | None = None

    def validate(self) -> None:
        if self.skip < 1:
            raise ConfigError("skip", f"must be at least 1, got {self.skip}")
        if self.max is not None and self.max < 0:
            raise ConfigError("max", f"must be >= 0, got {self.max}")
        if self.ids is not None and (self.skip != 1 or self.max is not None):
            raise ConfigError("ids", "give either ids or skip/max, not both")


@dataclass
class BudgetSettings:
    """Hard limits for one invocation of the job; every attempt sent counts, retries too."""

    max_queries: int | None = None
    max_cost: float | None = None
    price_per_1000: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_PRICES_PER_1000))

    def validate(self) -> None:
        if self.max_queries is None and self.max_cost is None:
            raise ConfigError("max_queries", "set budget.max_queries and/or budget.max_cost (no unbounded spending)")
        if self.max_queries is not None and self.max_queries < 0:
            raise ConfigError("max_queries", f"must be >= 0, got {self.max_queries}")
        if self.max_cost is not None and self.max_cost < 0:
            raise ConfigError("max_cost", f"must be >= 0, got {self.max_cost}")
        for name, price in self.price_per_1000.items():
            if name not in PROVIDERS:
                raise ConfigError(f"price_per_1000.{name}", f"unknown provider (known: {', '.join(PROVIDERS)})")
            if price < 0:
                raise ConfigError(f"price_per_1000.{name}", f"must be >= 0, got {price}")

    def price(self, provider: str) -> float:
        return float(self.price_per_1000.get(provider, DEFAULT_PRICES_PER_1000[provider]))


@dataclass
class RateSettings:
    """Client-side limits, for the whole job (split evenly across `actors`)."""

    qps: float = 5.0
    concurrency: int = 4
    actors: int = 1
    actor_cpus: float = 1.0

    def validate(self) -> None:
        if self.qps <= 0:
            raise ConfigError("qps", f"must be positive, got {self.qps}")
        if self.concurrency < 1:
            raise ConfigError("concurrency", f"must be at least 1, got {self.concurrency}")
        if self.actors < 1:
            raise ConfigError("actors", f"must be at least 1, got {self.actors}")
        if self.actor_cpus < 0:
            raise ConfigError("actor_cpus", f"must be >= 0, got {self.actor_cpus}")


@dataclass
class RetrySettings:
    """Exponential back-off with full jitter on throttling, timeouts and 5xx."""

    max_attempts: int = 6  # per query, the first try included
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    timeout_s: float = 30.0

    def validate(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError("max_attempts", f"must be at least 1, got {self.max_attempts}")
        for name in ("base_delay_s", "max_delay_s"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.timeout_s <= 0:
            raise ConfigError("timeout_s", f"must be positive, got {self.timeout_s}")


@dataclass
class CertifyApiConfig:
    """Everything `dsmooth certify-api` needs; see examples/certify_api_emulated.yaml."""

    api: ApiSettings
    data: DataSettings
    output: Path
    sigma: float
    budget: BudgetSettings
    n0: int = 20
    n: int = 100
    alpha: float = 0.001
    seed: int = 0
    chunk_size: int = 16
    denoiser: Path | None = None
    rate: RateSettings = field(default_factory=RateSettings)
    retry: RetrySettings = field(default_factory=RetrySettings)

    def validate(self) -> None:
        if self.sigma <= 0:
            raise ConfigError("sigma", f"must be positive, got {self.sigma}")
        if self.n0 < 1:
            raise ConfigError("n0", f"must be at least 1, got {self.n0}")
        if self.n < 1:
            raise ConfigError("n", f"must be at least 1, got {self.n}")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError("alpha", f"must lie in (0, 1), got {self.alpha}")
        if self.seed < 0:
            raise ConfigError("seed", f"must be >= 0, got {self.seed}")
        if self.chunk_size < 1:
            raise ConfigError("chunk_size", f"must be at least 1, got {self.chunk_size}")
