"""The `certify-api` job's YAML config, validated before a single (paid) query is sent.

Secrets never appear here: the config names *which* environment variables hold them, so
the config (and run.json, built from it) can be shared and committed safely.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.apis.chat_settings import ChatSettings, TokenPrices, TokenRate
from pipeline.config import (
    ConfigError,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Settings,
    Where,
    option,
)
from pipeline.settings import (
    ChunkSize,
    DataSelection,
    DatasetLayout,
    EstimationSamples,
    PoolSettings,
    Precision,
    SelectionSamples,
    SequentialSettings,
    SmoothingSettings,
)

Provider = Literal["aws", "google", "azure", "clarifai", "openai"]

# List prices in USD per 1,000 label-detection calls (first pricing tier, as published by
# each provider); only used to account spending against `budget.max_cost`.
DEFAULT_PRICES_PER_1000: dict[str, float] = {"aws": 1.00, "google": 1.50, "azure": 1.00, "clarifai": 1.20,
                                                   "openai": 0.0}  # openai: priced per token (TokenPrices)


class ApiSettings(Settings):
    """Which API, and how to reach it. `endpoint` overrides the provider's real endpoint
    (an emulator on 127.0.0.1, a proxy, a regional endpoint)."""

    provider: Provider = option(..., help="the vision API")
    endpoint: str | None = option(None, flag="--endpoint", metavar="URL", help=(
        "the provider's endpoint (e.g. the emulator's http://127.0.0.1:8790); default: the real service"))
    max_labels: PositiveInt = option(10, help="labels asked for per query; the query's class is the top one")
    region: str | None = option(None, help="aws: default from boto3's chain (AWS_REGION...), else us-east-1")
    google_api_key_env: str = option("GOOGLE_API_KEY", help="variable with a Google API key (unset: google.auth.default())")
    azure_key_env: str = option("VISION_KEY", help="variable with the Azure key")
    azure_endpoint_env: str = option("VISION_ENDPOINT", help="variable with the Azure endpoint")
    azure_api_version: str = option("2023-10-01", help="Azure AI Vision API version")
    clarifai_pat_env: str = option("CLARIFAI_PAT", help="variable with the Clarifai personal access token")
    clarifai_user: str = option("clarifai", help="Clarifai model owner")
    clarifai_app: str = option("main", help="Clarifai application")
    clarifai_model: str = option("general-image-recognition", help="Clarifai model id")
    clarifai_model_version: str | None = option(None, help="Clarifai model version (default: latest)")
    chat: ChatSettings = option(default_factory=ChatSettings, help="openai: the chat model and its prompt")

    @field_validator("endpoint")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {value!r}")
        return value

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


class BudgetSettings(Settings):
    """Hard limits on calls sent (retries count): per invocation, and for the whole run across
    every invocation and kill (the run's earlier calls come from its call journal)."""

    max_queries: NonNegativeInt | None = option(None, flag="--max-queries", metavar="K",
                                                help="calls this invocation may send (retries count)")
    max_cost: NonNegativeFloat | None = option(None, flag="--max-cost", metavar="USD",
                                               help="money this invocation may spend, in USD at list price")
    run_max_queries: NonNegativeInt | None = option(None, flag="--run-max-queries", metavar="K",
                                                    help="calls the whole run may send, every invocation included")
    run_max_cost: NonNegativeFloat | None = option(None, flag="--run-max-cost", metavar="USD",
                                                   help="money the whole run may spend, every invocation included")
    max_tokens: NonNegativeInt | None = option(None, flag="--max-tokens", metavar="K",
                                               help="openai: tokens this invocation may spend (prompt + answer)")
    run_max_tokens: NonNegativeInt | None = option(None, flag="--run-max-tokens", metavar="K",
                                                   help="openai: tokens the whole run may spend")
    tokens: TokenPrices = option(default_factory=TokenPrices, help="openai: prices per million tokens")
    price_per_1000: dict[Provider, NonNegativeFloat] = option(
        default_factory=lambda: dict(DEFAULT_PRICES_PER_1000), cli=False,
        help="list price per 1,000 calls, per provider (YAML only)")

    @model_validator(mode="after")
    def _bounded(self) -> BudgetSettings:
        if all(v is None for v in (self.max_queries, self.max_cost, self.run_max_queries, self.run_max_cost,
                                   self.max_tokens, self.run_max_tokens)):
            raise ConfigError("max_queries", "set budget.max_queries, max_cost, run_max_queries, run_max_cost, "
                                             "max_tokens and/or run_max_tokens (no unbounded spending)")
        return self

    def limits(self) -> dict[str, float | int | None]:
        """The pipeline.apis.books.ledger.Budget arguments (price aside)."""
        return {"max_queries": self.max_queries, "max_cost": self.max_cost,
                "run_max_queries": self.run_max_queries, "run_max_cost": self.run_max_cost,
                "max_tokens": self.max_tokens, "run_max_tokens": self.run_max_tokens}

    def price(self, provider: str) -> float:
        return float(self.price_per_1000.get(provider, DEFAULT_PRICES_PER_1000[provider]))


class RateSettings(Settings):
    """Client-side limits, for the whole job (split evenly across `actors`)."""

    qps: PositiveFloat = option(5.0, help=(
        "call starts per second, whole job: never more in any 1-second window (slower after throttling)"))
    concurrency: PositiveInt = option(4, help="queries in flight at once, whole job")
    actors: PositiveInt = option(1, help="Ray actors sharing the concurrency (the rate is job-wide)")
    actor_cpus: NonNegativeFloat = option(1.0, help="CPUs reserved per API actor")
    per_minute: TokenRate = option(default_factory=TokenRate, help="per-minute limits (requests, tokens)")


class RetrySettings(Settings):
    """Exponential back-off with full jitter on throttling, timeouts and 5xx."""

    max_attempts: PositiveInt = option(6, help="attempts per query, the first one included")
    base_delay_s: NonNegativeFloat = option(0.5, help="back-off: uniform(0, min(max_delay_s, base * 2^attempt))")
    max_delay_s: NonNegativeFloat = option(30.0, help="longest back-off")
    timeout_s: PositiveFloat = option(30.0, help="seconds to wait for one answer")


# Sequential API runs (issue 12): small chunks, since each sample is a paid query and a chunk
# is the least an image is asked for at a time; a cap of 240 queries per image.
SEQUENTIAL_API_CHUNK = 8
SEQUENTIAL_API_N_MAX = 240


class CertifyApiConfig(DataSelection, SmoothingSettings, SequentialSettings, PoolSettings):
    """Everything `dsmooth certify-api` needs; see examples/certify_api_emulated.yaml."""

    api: ApiSettings = option(..., help="the provider and how to reach it")
    dataset: DatasetLayout = option("folder", group="data")
    output: Where = option(..., flag="--output", metavar="RUN_DIR",
                          help="the run directory, local or s3://... / gs://... (resumed if it exists)")
    budget: BudgetSettings = option(..., help="hard spending limits")
    n0: SelectionSamples = option(20, group="smoothing", metavar="N0")
    n: EstimationSamples = option(100, group="smoothing", metavar="N")
    chunk_size: ChunkSize = option(16, group="smoothing", metavar="N")
    precision: Precision = option("fp32", group="models", help=(
        "arithmetic of the denoiser's forward passes (needs --denoiser): fp32, bf16 or fp16 autocast, or auto "
        "= bf16 where the device has it natively, else fp32. Part of the run identity when not fp32"))
    rate: RateSettings = Field(default_factory=RateSettings, description="client-side rate limits")
    retry: RetrySettings = Field(default_factory=RetrySettings, description="retries and back-off")
    default_n_max: ClassVar[int | None] = SEQUENTIAL_API_N_MAX  # n_max when none is set (SequentialSettings)

    @model_validator(mode="after")
    def _sequential_api(self) -> CertifyApiConfig:
        """An API's own sequential chunk default (8; n_max 240 is `default_n_max`) where the user
        set none; the label is the API's answer on the clean image, so only `certify_class: label`."""
        if self.precision != "fp32" and self.denoiser is None:
            raise ConfigError("precision", "precision applies to the denoiser's forward passes: give --denoiser too")
        if self.api.provider != "openai" and (self.budget.max_tokens is not None or self.budget.run_max_tokens is not None):
            raise ConfigError("budget.max_tokens", f"{self.api.provider} is priced per call, not per token: "
                                                   "use max_queries / max_cost")
        if not self.sequential:
            return self
        if self.certify_class != "label":
            raise ConfigError("certify_class", "certify-api certifies the API's answer on the clean image: "
                              "use certify_class label")
        if "chunk_size" not in self.model_fields_set:
            self.__dict__["chunk_size"] = SEQUENTIAL_API_CHUNK  # not setattr: that would validate again
        return self
