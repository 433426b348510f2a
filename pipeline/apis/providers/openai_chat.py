"""A vision-language model behind an OpenAI-compatible chat endpoint, used as a classifier.

Each query is one `POST {endpoint}/chat/completions` through the official `openai` client: the
image as a PNG data URL and the prompt; the answer is mapped to a class. With class names the
prompt asks for exactly one of them -- as a JSON schema (structured output) where the server
takes `response_format`, else as plain text -- and the reply is parsed strictly: a refusal,
a reply outside the classes, an unparseable or cut-off reply is a vote for *no class*
(`top_label` None, recorded with why and what was said). Without class names the normalised
reply text is the label, as a label API's top label is. A garbled HTTP body (not a chat
completion) is `MalformedResponse` and retried, as for the other providers: it says nothing
about the image.

Why a randomised model is still certified (temperature > 0, or a server that samples even at
0): smoothing certifies g(x) = argmax_c P(f(x + delta) = c), and nothing in Cohen et al.'s
argument (their Theorem 1, via the Neyman-Pearson lemma) needs f to be deterministic: it holds
for any f with values in [0, 1] per class, and a random answer's class probability
E_xi[1{f(x + delta; xi) = c}] is such an f. Smoothing then averages over the noise and the
model's own randomness xi together, each query drawing both afresh and independently, so
the n answers are i.i.d. Bernoulli(p_c(x)) draws and the Clopper-Pearson bound and the radius
hold exactly as for a deterministic model. What is certified is the smoothed *randomised*
classifier; a "no class" answer is one more outcome that counts against every class.
tests/test_api_openai.py checks this coverage statistically with an emulated model that
answers at random.

Credentials: the key comes from the variable named by `api.chat.key_env` (OPENAI_API_KEY by
default), read in the querying process; it is never logged, and error texts are scrubbed.
"""

from __future__ import annotations

import base64
import json
import os
import re
from typing import Any

from pipeline.apis.config import ApiSettings
from pipeline.apis.errors import AuthError, MalformedResponse, QueryTimeout, RequestRejected
from pipeline.apis.providers.base import Label, before_send, error_for_status
from pipeline.apis.secrets import scrub

DEFAULT_ENDPOINT = "https://api.openai.com/v1"
REPLY_CHARS = 200  # of a reply that gave no class, kept in the query log
NO_CLASS_REASONS = ("refusal", "outside", "unparseable", "truncated")


class ChatAnswer(list):
    """The labels of one answer (a list of Label), and what the journal records beside them:
    `journal` = {prompt_tokens, completion_tokens, no_class, reply}."""

    journal: dict[str, Any]


def normalise(text: str) -> str:
    """A reply as a label: stripped of quotes, markdown and closing punctuation, spaces
    collapsed, lower case ("A Cat." -> "a cat")."""
    text = re.sub(r"\s+", " ", text.strip().strip("`*\"' ").strip()).rstrip(".!").strip("\"' ")
    return text.casefold()


def parse_reply(content: str | None, classes: list[str] | None, structured: bool) -> tuple[str | None, str | None]:
    """(class, None) or (None, why): the strict reading of one reply."""
    if content is None or not content.strip():
        return None, "unparseable"
    if classes is None:
        label = normalise(content)
        return (label, None) if label else (None, "unparseable")
    text = content
    if structured:
        try:
            payload = json.loads(content)
        except ValueError:
            return None, "unparseable"
        if not isinstance(payload, dict) or set(payload) != {"class"} or not isinstance(payload["class"], str):
            return None, "unparseable"
        text = payload["class"]
    by_name = {name.casefold(): name for name in classes}
    name = by_name.get(normalise(text))
    return (name, None) if name is not None else (None, "outside")


def class_schema(classes: list[str]) -> dict[str, Any]:
    """The response_format of a structured answer: {"class": one of `classes`}."""
    return {"type": "json_schema", "json_schema": {"name": "image_class", "strict": True, "schema": {
        "type": "object", "properties": {"class": {"type": "string", "enum": list(classes)}},
        "required": ["class"], "additionalProperties": False}}}


class OpenAIChat:
    provider = "openai"
    gates_sends = True  # httpx's request hook calls before_send()

    def __init__(self, settings: ApiSettings, timeout_s: float, pool_size: int = 10) -> None:
        try:
            import openai
        except ImportError:
            raise RequestRejected("the openai provider needs the `openai` package: pip install 'dsmooth[openai]'") from None

        chat = settings.chat
        key = os.environ.get(chat.key_env) or ""
        if not key:
            raise AuthError(f"no API key: set {chat.key_env} (a local server takes any non-empty value)")
        self.classes = chat.resolve_classes()
        self.prompt = chat.template(self.classes).format(classes=", ".join(self.classes or []))
        self.structured = bool(chat.structured and self.classes)
        self.options: dict[str, Any] = {"model": chat.model, "temperature": chat.temperature,
                                        "max_tokens": chat.answer_tokens}
        if chat.chat_seed is not None:
            self.options["seed"] = chat.chat_seed
        if self.structured:
            self.options["response_format"] = class_schema(self.classes or [])
        http = openai.DefaultHttpxClient(event_hooks={"request": [lambda request: before_send()]})
        # max_retries=0: dsmooth retries, so that every attempt is budgeted and journaled.
        self._client = openai.OpenAI(api_key=key, base_url=settings.endpoint or DEFAULT_ENDPOINT, max_retries=0,
                                     timeout=timeout_s, http_client=http)

    def labels(self, image: bytes) -> ChatAnswer:
        import openai

        url = "data:image/png;base64," + base64.b64encode(image).decode("ascii")
        messages = [{"role": "user", "content": [{"type": "text", "text": self.prompt},
                                                 {"type": "image_url", "image_url": {"url": url}}]}]
        try:
            completion = self._client.chat.completions.create(messages=messages, **self.options)
        except openai.APITimeoutError as error:
            raise QueryTimeout(f"timeout: {scrub(error)}") from None
        except openai.APIConnectionError as error:
            raise QueryTimeout(f"{type(error).__name__}: {scrub(error)}") from None
        except openai.APIStatusError as error:
            headers = error.response.headers
            retry_after = headers.get("retry-after")
            if retry_after is None and headers.get("retry-after-ms") is not None:
                retry_after = str(float(headers["retry-after-ms"]) / 1000)
            raise error_for_status(error.status_code, _error_text(error), retry_after) from None
        except openai.APIResponseValidationError as error:
            raise MalformedResponse(f"not a chat completion: {scrub(error)[:200]}") from None
        except (ValueError, TypeError) as error:  # a body that is not JSON at all
            raise MalformedResponse(f"not a chat completion ({type(error).__name__})") from None
        return self._answer(completion)

    def _answer(self, completion: Any) -> ChatAnswer:
        choices = getattr(completion, "choices", None)
        if not isinstance(choices, list) or not choices or getattr(choices[0], "message", None) is None:
            raise MalformedResponse("answer has no choices[0].message")
        choice = choices[0]
        message = choice.message
        content = message.content if isinstance(message.content, str) else None
        refusal = getattr(message, "refusal", None)
        if refusal or choice.finish_reason == "content_filter":
            label, why = None, "refusal"
        elif choice.finish_reason == "length":
            label, why = None, "truncated"
        else:
            label, why = parse_reply(content, self.classes, self.structured)
        usage = getattr(completion, "usage", None)
        answer = ChatAnswer([Label(label, 1.0)] if label is not None else [])
        answer.journal = {
            "prompt_tokens": getattr(usage, "prompt_tokens", None),
            "completion_tokens": getattr(usage, "completion_tokens", None),
            "no_class": why,
            "reply": (refusal or content or "")[:REPLY_CHARS] if why else None,
        }
        return answer


def _error_text(error: Any) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else None
        if message:
            return str(message)
    return str(getattr(error, "message", "") or type(error).__name__)

