"""Which calls a provider bills: what the spend record counts as money actually owed.

Budgets hold on attempts (every call sent counts). What the provider will bill is fewer:
the four providers charge for images they processed -- an answer, even one we could not
parse -- and not for requests they refused before processing: throttling (429 /
ThrottlingException), rejected credentials, rejected requests, their own 5xx errors (AWS
Rekognition, Google Cloud Vision, Azure AI Vision and Clarifai all bill per processed
image). A call whose outcome is unknown -- it timed out, or the job was killed while it
was in flight -- may have been processed, so it is counted as billed: the record errs
towards the provider's count, never below it.
"""

from __future__ import annotations

# outcome status -> billed? (None = an unconfirmed call: sent, no answer recorded)
_DEFAULT = {
    "ok": True,
    "malformed": True,
    "timeout": True,
    None: True,
    "throttled": False,
    "auth": False,
    "rejected": False,
    "server_error": False,
    "error": True,  # an unknown failure: may have been processed
}
RULES: dict[str, dict[str | None, bool]] = {provider: dict(_DEFAULT)
                                            for provider in ("aws", "google", "azure", "clarifai", "openai")}
# openai: chat APIs bill the tokens of every completed answer (a refusal included) and nothing
# for 429s, refused keys, rejected requests or their own 5xx: the same rules, in tokens.


def billable(provider: str, status: str | None) -> bool:
    rules = RULES.get(provider, _DEFAULT)
    return rules.get(status, True)
