"""Switchable failures for the emulator, drawn per request from a seeded generator."""

from __future__ import annotations

import random
import threading
from dataclasses import asdict, dataclass, fields
from typing import Any



@dataclass
class FaultSettings:
    """Probabilities per request (0..1) and an added latency.

    `auth_failure` rejects every request as the provider does for a bad key; `throttle`
    answers 429 / ThrottlingException; `server_error` a 5xx; `malformed` a 200 whose body
    is not a valid answer; `latency_s` delays a `latency_rate` fraction of answers.
    Chat models only (other providers answer normally): `refusal` refuses to answer,
    `garbage` replies with text that names no class. `retry_after_s`: the Retry-After a
    429 carries (where the provider sends one).
    """

    auth_failure: bool = False
    throttle: float = 0.0
    server_error: float = 0.0
    malformed: float = 0.0
    latency_s: float = 0.0
    latency_rate: float = 1.0
    refusal: float = 0.0
    garbage: float = 0.0
    retry_after_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("throttle", "server_error", "malformed", "latency_rate", "refusal", "garbage"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"fault {name} must be a probability in [0, 1], got {value!r}")
        if self.latency_s < 0:
            raise ValueError(f"fault latency_s must be >= 0, got {self.latency_s!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaultSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fault {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FaultInjector:
    """Per-provider fault settings and the draw for each request (thread-safe)."""

    def __init__(self, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._default = FaultSettings()
        self._per_provider: dict[str, FaultSettings] = {}

    def set(self, settings: FaultSettings, provider: str | None = None) -> None:
        """Apply to one provider, or (provider None) to all of them, replacing overrides."""
        with self._lock:
            if provider is None:
                self._default = settings
                self._per_provider.clear()
            else:
                self._per_provider[provider] = settings

    def settings(self, provider: str) -> FaultSettings:
        with self._lock:
            return self._per_provider.get(provider, self._default)

    def draw(self, provider: str) -> tuple[str | None, float]:
        """(fault to answer with or None, seconds to wait first)."""
        settings = self.settings(provider)
        with self._lock:
            delay = settings.latency_s if self._random.random() < settings.latency_rate else 0.0
            if settings.auth_failure:
                return "auth_failure", delay
            roll = self._random.random()
        for name in ("throttle", "server_error", "malformed", "refusal", "garbage"):
            probability = getattr(settings, name)
            if roll < probability:
                return name, delay
            roll -= probability
        return None, delay
