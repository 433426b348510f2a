"""The emulator's OpenAI-compatible chat endpoint (`POST /v1/chat/completions`), the shape
OpenAI, vLLM, llama.cpp's server and Ollama serve: a vision-language model used as a
classifier, answering from the emulator's classifier.

The model reads the image from the message's PNG data URL. Asked for one of a set of
classes (a JSON schema's enum in `response_format`, or the prompt's list), it names the best
of its labels that is in the set -- or its top label when none is, an answer outside the set.
At temperature 0 the answer is the best label; above 0 it is drawn with probability
proportional to score^(1/T) (seeded by the request's `seed` and its bytes when a seed is
sent, as servers that take one do). Each answer carries a deterministic `usage`: prompt tokens
from the prompt's length and the image's size (85 + 170 per 512-px tile, as OpenAI counts),
completion tokens from the reply's length. Faults as for the other protocols (429 with
Retry-After, 5xx, latency, malformed bodies) and two of its own: refusals and garbage replies.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import threading
import time
import uuid
from typing import Any

from pipeline.apis.emulator.protocols import BadRequest, Labels, Protocol, Request, Response, _json, _load_json

REFUSAL = "I'm sorry, but I can't help with identifying this image."
GARBAGE = "Hmm, hard to say -- it could be a few things, honestly."


def image_tokens(width: int, height: int) -> int:
    return 85 + 170 * math.ceil(width / 512) * math.ceil(height / 512)


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


class OpenAIChat(Protocol):
    name = "openai"
    PATHS = ("/v1/chat/completions", "/chat/completions")

    def __init__(self) -> None:
        self._random = random.Random(0)
        self._lock = threading.Lock()

    def matches(self, request: Request) -> bool:
        return request.method == "POST" and request.path in self.PATHS

    def has_credentials(self, request: Request) -> bool:
        return request.headers.get("authorization", "").startswith("Bearer ") and len(
            request.headers["authorization"]) > len("Bearer ")

    def image(self, request: Request) -> tuple[bytes, dict[str, Any]]:
        payload = _load_json(request.body)
        if not isinstance(payload, dict) or not isinstance(payload.get("model"), str):
            raise BadRequest("model is required")
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list")
        texts, urls = [], []
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
            for part in parts:
                if isinstance(part, dict) and part.get("type") == "text":
                    texts.append(str(part.get("text", "")))
                elif isinstance(part, dict) and part.get("type") == "image_url":
                    urls.append(str((part.get("image_url") or {}).get("url", "")))
        if len(urls) != 1 or not urls[0].startswith("data:image/"):
            raise BadRequest("send exactly one image, as a data: URL")
        try:
            encoded = base64.b64decode(urls[0].split(",", 1)[1], validate=True)
        except (IndexError, ValueError):
            raise BadRequest("the image data URL is not valid base64") from None
        prompt = "\n".join(texts)
        schema = payload.get("response_format")
        enum = _enum(schema)
        options = {
            "model": payload["model"], "prompt": prompt, "classes": enum, "json": enum is not None,
            "temperature": float(payload.get("temperature") or 0.0), "seed": payload.get("seed"),
            "max_tokens": payload.get("max_completion_tokens") or payload.get("max_tokens"),
            "prompt_tokens": 10 * len(messages) + text_tokens(prompt) + (text_tokens(json.dumps(schema)) if schema else 0),
            "digest": hashlib.sha256(request.body).hexdigest(),
        }
        return encoded, options

    def choose(self, labels: Labels, options: dict[str, Any]) -> str:
        """The model's answer among its labels (see the module doc)."""
        wanted = options["classes"] or _listed(options["prompt"], [n for n, _ in labels])
        if wanted:
            by_name = {w.casefold(): w for w in wanted}
            inside = [(by_name[n.casefold()], s) for n, s in labels if n.casefold() in by_name]
            labels = inside or labels[:1]
        if options["temperature"] <= 0 or len(labels) == 1:
            return labels[0][0]
        weights = [max(s, 1e-12) ** (1.0 / options["temperature"]) for _, s in labels]
        if options["seed"] is not None:
            return random.Random(f"{options['seed']}:{options['digest']}").choices([n for n, _ in labels], weights)[0]
        with self._lock:
            return self._random.choices([n for n, _ in labels], weights)[0]

    def answer(self, labels: Labels, options: dict[str, Any], size: tuple[int, int]) -> Response:
        name = self.choose(labels, options)
        return self.reply(json.dumps({"class": name}) if options["json"] else name, options, size)

    def reply(self, content: str | None, options: dict[str, Any], size: tuple[int, int],
              refusal: str | None = None) -> Response:
        completion = text_tokens(content or refusal or "") + 1
        finish = "stop"
        cap = options.get("max_tokens")
        if content is not None and isinstance(cap, int) and completion > cap:
            content, completion, finish = content[: max(0, 4 * (cap - 1))], cap, "length"
        prompt = options["prompt_tokens"] + image_tokens(*size)
        body = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": options["model"], "system_fingerprint": "fp_dsmooth_emulator",
            "choices": [{"index": 0, "finish_reason": finish, "logprobs": None,
                         "message": {"role": "assistant", "content": content, "refusal": refusal}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }
        return _json(200, body, **{"x-request-id": uuid.uuid4().hex})

    def answer_fault(self, kind: str, options: dict[str, Any], size: tuple[int, int]) -> Response:
        """A refusal (message.refusal, no content) or a garbage reply (neither a class nor JSON)."""
        if kind == "refusal":
            return self.reply(None, options, size, refusal=REFUSAL)
        return self.reply(GARBAGE, options, size)

    def error(self, kind: str, message: str = "", retry_after_s: float = 0.0) -> Response:
        status, kind_name, code, text = {
            "auth_failure": (401, "invalid_request_error", "invalid_api_key",
                             f"Incorrect API key provided: {message}."),
            "missing_credentials": (401, "invalid_request_error", None, "You didn't provide an API key."),
            "throttle": (429, "requests", "rate_limit_exceeded", "Rate limit reached for requests per min (RPM)."),
            "server_error": (500, "server_error", None, "The server had an error while processing your request."),
            "bad_request": (400, "invalid_request_error", None, message or "Invalid request."),
            "bad_image": (400, "invalid_request_error", "invalid_image", "You uploaded an unsupported image."),
        }[kind]
        headers = {"retry-after": f"{retry_after_s:g}"} if kind == "throttle" else {}
        return _json(status, {"error": {"message": text, "type": kind_name, "param": None, "code": code}}, **headers)


def _enum(response_format: Any) -> list[str] | None:
    try:
        enum = response_format["json_schema"]["schema"]["properties"]["class"]["enum"]
    except (KeyError, TypeError):
        return None
    return [str(e) for e in enum] if isinstance(enum, list) and enum else None


def _listed(prompt: str, names: list[str]) -> list[str]:
    """The labels a plain-text prompt lists (a model reads its instructions)."""
    lowered = prompt.casefold()
    return [n for n in names if n.casefold() in lowered]


class RandomClassifier:
    """An emulated model that answers at random, whatever the image: class c with
    probability `probabilities[c]` (a model sampling at high temperature). Its smoothed
    classifier's class probabilities are exactly `probabilities`, so a certificate of it can
    be checked against the truth."""

    def __init__(self, probabilities: dict[str, float], seed: int = 0) -> None:
        total = sum(probabilities.values())
        if total <= 0 or any(p < 0 for p in probabilities.values()):
            raise ValueError("probabilities must be non-negative with a positive sum")
        self.names = list(probabilities)
        self.weights = [p / total for p in probabilities.values()]
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def labels(self, rgb: Any) -> list[tuple[str, float]]:
        with self._lock:
            drawn = self._random.choices(self.names, self.weights)[0]
        return [(drawn, 1.0)]
