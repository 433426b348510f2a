"""Settings of the `openai` provider: a vision-language model behind an OpenAI-compatible
chat endpoint (OpenAI itself, or vLLM / llama.cpp / Ollama serving one locally), used as a
zero-shot classifier. Only what changes the model's answers goes into the run identity.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import field_validator, model_validator

from pipeline.config import ConfigError, NonNegativeFloat, PositiveInt, Settings, option

CLASSES_PROMPT = ("Classify this image. Answer with exactly one of these classes and nothing else: {classes}.")
FREE_PROMPT = "What is the main subject of this image? Answer with one or two words and nothing else."


class ChatSettings(Settings):
    """How each query asks the model (the `openai` provider only)."""

    model: str = option("gpt-4o-mini", flag="--openai-model", metavar="NAME",
                        help="the chat model (as the server names it, e.g. gpt-4o-mini, Qwen/Qwen2-VL-7B-Instruct)")
    key_env: str = option("OPENAI_API_KEY", flag="--openai-key-env", metavar="VAR",
                          help="variable holding the API key (a local server takes any non-empty value)")
    class_names: str | None = option(None, flag="--class-names", metavar="FILE", help=(
        "file with one class name a line: the answer must be one of them (default: the data set's classes, "
        "if it has any; none: the normalised answer text is the label)"))
    classes: list[str] | None = option(None, cli=False, help=(
        "the class names inline (YAML only), instead of --class-names"))
    prompt: str | None = option(None, flag="--prompt", metavar="TEXT", help=(
        "prompt template; {classes} is replaced by the class names, comma-separated (default: a built-in "
        "prompt). Part of the run identity"))
    temperature: NonNegativeFloat = option(0.0, flag="--temperature", metavar="T",
                                           help="sampling temperature sent with each query (identity)")
    chat_seed: int | None = option(None, flag="--chat-seed", metavar="S",
                                   help="the `seed` sent with each query, where the server takes one (identity)")
    answer_tokens: PositiveInt = option(50, flag="--answer-tokens", metavar="K",
                                        help="most completion tokens per answer (max_tokens; identity)")
    structured: bool = option(True, flag="--structured", help=(
        "ask for a JSON schema answer (structured output) when classes are given; --no-structured: plain "
        "text, parsed strictly (for servers without response_format)"))

    @field_validator("prompt")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                value.format(classes="x")
            except (KeyError, IndexError, ValueError) as error:
                raise ValueError(f"the prompt may hold only the placeholder {{classes}} ({error})") from None
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ChatSettings:
        if self.classes is not None and self.class_names is not None:
            raise ConfigError("api.chat.classes", "give the classes inline or as --class-names FILE, not both")
        if self.classes is not None:
            _check_names(self.classes, "api.chat.classes")
        return self

    def resolve_classes(self, dataset_classes: list[str] | None = None) -> list[str] | None:
        """The class names the model must choose from (None: free answers): inline, else
        from the --class-names file, else the data set's."""
        if self.classes is not None:
            return list(self.classes)
        if self.class_names is not None:
            try:
                text = Path(self.class_names).read_text()
            except OSError as error:
                raise ConfigError("api.chat.class_names", f"cannot read {self.class_names}: {error.strerror}") from None
            return _check_names([line.strip() for line in text.splitlines() if line.strip()], "api.chat.class_names")
        return list(dataset_classes) if dataset_classes else None

    def template(self, classes: list[str] | None) -> str:
        return self.prompt if self.prompt is not None else (CLASSES_PROMPT if classes else FREE_PROMPT)

    def identity(self, classes: list[str] | None) -> dict[str, Any]:
        """What changes the answers: model, prompt, classes, temperature, seed, answer length."""
        template = self.template(classes)
        return {
            "openai_model": self.model,
            "prompt": template,
            "prompt_sha256": prompt_digest(template, classes),
            "classes": classes,
            "temperature": self.temperature,
            "chat_seed": self.chat_seed,
            "answer_tokens": self.answer_tokens,
            "structured": bool(self.structured and classes),
        }


def _check_names(names: list[str], where: str) -> list[str]:
    if not names or any(not n.strip() for n in names):
        raise ConfigError(where, "class names must be non-empty (and there must be at least one)")
    if len({n.strip().casefold() for n in names}) != len(names):
        raise ConfigError(where, "class names repeat (case aside)")
    return [n.strip() for n in names]


def prompt_digest(template: str, classes: list[str] | None) -> str:
    """A short name for (prompt, classes): tables and figures name a run's prompt by it."""
    text = template + "\n" + "\n".join(classes or [])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class TokenPrices(Settings):
    """List prices per million tokens (the `openai` provider's money is tokens)."""

    input_per_million: NonNegativeFloat = option(0.0, flag="--input-price", metavar="USD",
                                                 help="USD per million prompt tokens (0: a local server)")
    output_per_million: NonNegativeFloat = option(0.0, flag="--output-price", metavar="USD",
                                                  help="USD per million completion tokens")
    prompt_tokens_guess: PositiveInt = option(1500, cli=False, help=(
        "prompt tokens reserved per call before the first answer tells the real count (YAML only)"))


class TokenRate(Settings):
    """Per-minute limits, as chat APIs publish them (None: no such limit)."""

    requests_per_minute: PositiveInt | None = option(None, flag="--requests-per-minute", metavar="K",
                                                     help="call starts in any 60 s, whole job")
    tokens_per_minute: PositiveInt | None = option(None, flag="--tokens-per-minute", metavar="K",
                                                   help="tokens (reserved per call) started in any 60 s, whole job")



def token_budget(config: Any, before: Any, state: Any) -> dict[str, Any]:
    """The pipeline.apis.books.ledger.Budget arguments of a token-priced run: prices, the answer cap
    each call is sent with, and what the run's earlier invocations spent (`before`, a
    pipeline.apis.books.querylog.Spend) and the largest prompt they were charged (from `state`,
    the run's answered queries), so the first reservations of a resumed run are real ones."""
    prices = config.budget.tokens
    seen = [row.get("prompt_tokens") for image in state.images.values() for row in image.rows.values()]
    seen = [int(v) for v in seen if isinstance(v, (int, float)) and v == v]
    return {
        "token_prices": (prices.input_per_million, prices.output_per_million),
        "answer_tokens": config.api.chat.answer_tokens,
        "prompt_tokens_guess": prices.prompt_tokens_guess,
        "prompt_tokens_seen": max(seen, default=0),
        "run_tokens_before": before.tokens,
        "run_cost_before": before.token_cost,
    }
