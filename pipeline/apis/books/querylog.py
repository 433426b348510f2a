"""The query log: every call an API run sent, with its answer, from the journal and its
compacted Parquet parts; and the per-query view that resume, votes and reports use.

Paid answers are the expensive part of an API certification, so every one is kept with the
full label list and scores; vote counts, certificates at another alpha, or with a smaller
n0/n, are recomputed from this log without a new query (`votes_from_queries`). A query with
an `ok` answer is never asked again; one whose calls all failed (malformed answers
included, after every retry) is asked again by a later run.

Calls live first in the call journal (pipeline.apis.books.journal), then, once their invocation
has ended, in `RUN/queries/part-*.parquet` parts of at most PART_CALLS calls each, each
with a manifest of its images: a damaged part costs those images' answers, named in the
error, never the whole log -- and never the record of what was spent: `RUN/spend.json` keeps
each invocation's calls, and a figure recomputed from the log never goes below it.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import pyarrow as pa

from pipeline.apis.books import journal
from pipeline.apis.books.billing import billable
from pipeline.apis.query.units import CLEAN, phase_sizes
from pipeline.runs.fs import Location, StorageError
from pipeline.runs.storage import PartStream, read_run_record, write_json
from pipeline.runs.storage import VoteRow

log = logging.getLogger("dsmooth")

QUERIES_DIR = "queries"
SPEND_FILE = "spend.json"  # what each invocation sent and owes (spend_record)
OK = "ok"
# Calls per compacted part: bounds what one damaged file can cost. DSMOOTH_QUERY_PART_CALLS
# changes it (the durability tests use small parts to stretch compaction out).
PART_CALLS = int(os.environ.get("DSMOOTH_QUERY_PART_CALLS", "10000"))

CALL_SCHEMA = pa.schema(
    [
        ("call", pa.string()),  # unique id of one attempt
        ("invocation", pa.string()),  # the job invocation that sent it
        ("provider", pa.string()),
        ("image_id", pa.int64()),
        ("image_name", pa.string()),
        ("phase", pa.string()),  # clean | selection | estimation
        ("sample", pa.int64()),  # index within the phase (0 for the clean query)
        ("attempt", pa.int64()),  # 1 for the first call of a query in an invocation
        ("worker", pa.string()),
        ("sent_at", pa.timestamp("ms", tz="UTC")),
        ("status", pa.string()),  # ok | malformed | throttled | server_error | timeout | auth | rejected
        #                           | error; null: unconfirmed (no answer recorded: killed in flight)
        ("billable", pa.bool_()),  # what the provider bills (pipeline.apis.books.billing)
        ("top_label", pa.string()),  # the query's class; null when no label came back
        ("labels", pa.list_(pa.string())),  # every returned label, in the provider's order
        ("scores", pa.list_(pa.float64())),  # their scores in [0, 1]
        ("latency_s", pa.float64()),
        ("error", pa.string()),  # scrubbed of secrets
        ("answered_at", pa.timestamp("ms", tz="UTC")),
        # token-priced providers (openai): usage and cost as charged; a call's reservation
        # (what an unconfirmed one is charged); why an answer gave no class, and its text
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("cost", pa.float64()),
        ("reserved_tokens", pa.int64()),
        ("reserved_cost", pa.float64()),
        ("no_class", pa.string()),  # refusal | outside | unparseable | truncated; null: a class
        ("reply", pa.string()),  # the model's answer text (shortened)
    ]
)
CALLS = PartStream(QUERIES_DIR, CALL_SCHEMA)


def sent_record(call: str, invocation: str, provider: str, image_id: int, image_name: str, phase: str,
                sample: int, attempt: int, worker: str) -> dict[str, Any]:
    """The journal record written before a call leaves."""
    return {"k": "sent", "call": call, "invocation": invocation, "provider": provider, "image_id": image_id,
            "image_name": image_name, "phase": phase, "sample": sample, "attempt": attempt, "worker": worker,
            "sent_at": datetime.now(timezone.utc).isoformat()}


def answer_record(call: str, provider: str, status: str, **fields: Any) -> dict[str, Any]:
    """The journal record of a call's outcome."""
    return {"k": "answer", "call": call, "status": status, "billable": billable(provider, status),
            "answered_at": datetime.now(timezone.utc).isoformat(), **fields}


def calls_from_records(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Journal records -> one row per call (its `sent` record merged with its answer, if any)."""
    calls: dict[str, dict[str, Any]] = {}
    for record in records:
        row = calls.setdefault(record["call"], {})
        fields = {k: v for k, v in record.items() if k != "k"}
        if record.get("k") == "answer":
            row.update(fields)
        else:
            row.update({k: v for k, v in fields.items() if k not in row})
    for row in calls.values():
        if row.get("status") is None:
            row["billable"] = billable(row.get("provider", ""), None)
    return [row for row in calls.values() if "image_id" in row]


def _normalise(row: Mapping[str, Any]) -> dict[str, Any]:
    """A call row with CALL_SCHEMA's fields, timestamps as datetimes (the journal has ISO text)."""
    out = {f.name: row.get(f.name) for f in CALL_SCHEMA}
    for name in ("sent_at", "answered_at"):
        if isinstance(out[name], str):
            out[name] = datetime.fromisoformat(out[name])
    return out


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pa.Table.from_pylist([_normalise(row) for row in rows], schema=CALL_SCHEMA).to_pandas()


def read_calls(run_dir: str | Location) -> pd.DataFrame:
    """Every call of the run: compacted parts plus journal segments (a call in both -- a crash
    during compaction -- once, its answered version first)."""
    parts = CALLS.read(run_dir)
    live = calls_from_records(journal.replay_calls(run_dir))
    frames = [f for f in (parts, _frame(live) if live else None) if f is not None and not f.empty]
    if not frames:
        return CALL_SCHEMA.empty_table().to_pandas()
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    frame = frame.assign(_answered=frame["status"].notna())
    frame = frame.sort_values(["call", "_answered"], ascending=[True, False], kind="stable")
    return frame.drop_duplicates("call", keep="first").drop(columns="_answered").reset_index(drop=True)


def read_query_log(run_dir: str | Location, dedup: bool = True) -> pd.DataFrame:
    """dedup=False: every call. dedup=True: one row per (image, phase, sample) -- its first
    `ok` answer if any, else its latest call -- with `attempts`, the calls it took."""
    frame = read_calls(run_dir)
    if not dedup or frame.empty:
        return frame.assign(attempts=1) if not dedup else frame.assign(attempts=pd.Series(dtype="int64"))
    key = ["image_id", "phase", "sample"]
    attempts = frame.groupby(key).size().rename("attempts")
    by_time = frame.sort_values([*key, "sent_at"], kind="stable")
    answered = by_time[by_time["status"] == OK].drop_duplicates(key, keep="first")
    unanswered = by_time[~by_time.set_index(key).index.isin(answered.set_index(key).index)]
    chosen = pd.concat([answered, unanswered.drop_duplicates(key, keep="last")])
    chosen = chosen.merge(attempts, left_on=key, right_index=True)
    return chosen.sort_values(key, kind="stable").reset_index(drop=True)


def compact(run_dir: str | Location, keep_invocation: str | None = None) -> int:
    """Turn the journal segments of finished invocations into Parquet parts (at most
    PART_CALLS calls each), then delete the segments. Safe at any crash point: a part is
    written before its segments go, and readers drop calls seen twice. Returns calls moved."""
    segments = [s for s in journal.segments(run_dir)
                if keep_invocation is None or f"-{keep_invocation}-" not in s.name]
    if not segments:
        return 0
    rows = calls_from_records(r for s in segments for r in journal.read_segment(s))
    rows.sort(key=lambda row: (row["image_id"], row.get("phase", ""), row.get("sample", 0), row["call"]))
    for start in range(0, len(rows), PART_CALLS):
        CALLS.write(run_dir, [_normalise(row) for row in rows[start : start + PART_CALLS]], worker="compact")
    for segment in segments:
        segment.delete()
    return len(rows)


@dataclass(frozen=True)
class Spend:
    """What a run has sent and what it owes, over every invocation."""

    calls: int  # attempts sent (the budget counts these)
    unconfirmed: int  # sent, no answer recorded (killed in flight): may or may not have arrived
    billable: int  # calls the provider bills (unconfirmed included)
    tokens: int = 0  # token-priced providers: tokens charged (unconfirmed calls at their reservation)
    token_cost: float = 0.0  # and their price

    def cost(self, price_per_1000: float) -> float:
        return self.billable * price_per_1000 / 1000.0 + self.token_cost


def spend(run_dir: str | Location) -> Spend:
    """What the run has sent and owes over every invocation (see invocation_spend)."""
    entries = invocation_spend(run_dir)
    return Spend(*(sum(int(e[key]) for e in entries) for key in ("calls", "unconfirmed", "billable")),
                 tokens=sum(int(e.get("tokens") or 0) for e in entries),
                 token_cost=round(sum(float(e.get("token_cost") or 0.0) for e in entries), 9))


def invocation_spend(run_dir: str | Location) -> list[dict[str, Any]]:
    """Per invocation (by its first call): calls sent, billable, unconfirmed, first and last
    call, from the call log -- or from RUN/spend.json where that recorded more calls: a query
    part deleted after it was damaged loses its answers, not the money they cost."""
    calls = read_calls(run_dir)
    entries: dict[str, dict[str, Any]] = {}
    for invocation, group in calls.groupby("invocation", sort=False) if not calls.empty else []:
        entries[str(invocation)] = {
            "invocation": str(invocation),
            "first_call": str(group["sent_at"].min()), "last_call": str(group["sent_at"].max()),
            "calls": len(group), "billable": int(group["billable"].fillna(True).sum()),
            "unconfirmed": int(group["status"].isna().sum()),
            **_token_spend(group),
        }
    for old in _recorded_invocations(run_dir):
        now = entries.get(old["invocation"])
        if now is None or now["calls"] < int(old["calls"]):
            kept = {key: old.get(key) for key in ("invocation", "first_call", "last_call", "calls", "billable",
                                                  "unconfirmed", "tokens", "token_cost")}
            entries[old["invocation"]] = {**kept, "calls_not_in_log": int(old["calls"]) - (now["calls"] if now else 0)}
    return sorted(entries.values(), key=lambda entry: str(entry["first_call"] or ""))


def _token_spend(group: pd.DataFrame) -> dict[str, Any]:
    """Tokens and their cost of one invocation's calls: usage as charged, and the reservation
    of each unconfirmed call (it may have been answered and billed)."""
    unconfirmed = group["status"].isna()
    used = group["prompt_tokens"].fillna(0) + group["completion_tokens"].fillna(0)
    tokens = int(used[~unconfirmed].sum() + group["reserved_tokens"].fillna(0)[unconfirmed].sum())
    cost = float(group["cost"].fillna(0.0)[~unconfirmed].sum() + group["reserved_cost"].fillna(0.0)[unconfirmed].sum())
    return {"tokens": tokens, "token_cost": round(cost, 9)}


def spend_record(run_dir: str | Location, price_per_1000: float) -> dict[str, Any]:
    """RUN/spend.json: each invocation's calls, tokens and cost (calls at `price_per_1000`
    plus tokens at their price), and the total."""
    invocations = [{**entry, "tokens": int(entry.get("tokens") or 0),
                    "token_cost": float(entry.get("token_cost") or 0.0),
                    "cost": round(int(entry["billable"]) * price_per_1000 / 1000
                                  + float(entry.get("token_cost") or 0.0), 9)}
                   for entry in invocation_spend(run_dir)]
    keys = ("calls", "billable", "unconfirmed") + (("tokens",) if any(e["tokens"] for e in invocations) else ())
    total = {key: sum(int(entry[key]) for entry in invocations) for key in keys}
    return {"price_per_1000": price_per_1000, "invocations": invocations,
            "total": {**total, "cost": round(sum(entry["cost"] for entry in invocations), 9)}}


def write_spend_record(run_dir: str | Location, price_per_1000: float) -> None:
    write_json(spend_record(run_dir, price_per_1000), Location.of(run_dir) / SPEND_FILE)


def _recorded_invocations(run_dir: str | Location) -> list[dict[str, Any]]:
    """The invocations RUN/spend.json lists (none when there is no readable one)."""
    try:
        record = json.loads((Location.of(run_dir) / SPEND_FILE).read_text())
        return [entry for entry in record.get("invocations", [])
                if isinstance(entry, dict) and {"invocation", "calls", "billable", "unconfirmed"} <= entry.keys()]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, AttributeError, StorageError) as error:
        log.warning("%s/%s is unreadable (%s): spend is recomputed from the call log alone", run_dir, SPEND_FILE, error)
        return []


def answer_vote_rows(
    queries: Sequence[Mapping[str, Any]],
    identity: Mapping[str, Any],
    run_id: str,
    n0: int,
    n: int,
) -> list[VoteRow] | None:
    """The selection and estimation `VoteRow`s of ONE image from its
    answered queries, using samples 0..n0-1 and 0..n-1; None while any of them is missing.

    Every sample counts in `n`, so an answer without a label counts against the top class
    instead of shrinking the sample.
    """
    by_key = {(str(q["phase"]), int(q["sample"])): q for q in queries if q.get("status") == OK}
    clean = by_key.get((CLEAN, 0))
    if clean is None:
        return None
    rows = []
    for phase, size in phase_sizes(n0, n).items():
        if phase == CLEAN:
            continue
        chosen = [by_key.get((phase, k)) for k in range(size)]
        if any(q is None for q in chosen):
            return None
        rows.append(answer_vote_row(clean, chosen, phase, identity, run_id))
    return rows


def answer_vote_row(clean: Mapping[str, Any], chosen: Sequence[Mapping[str, Any]], phase: str,
                    identity: Mapping[str, Any], run_id: str, chunk: int | None = None) -> VoteRow:
    """The `VoteRow` of answered queries `chosen` of one image and phase (a whole phase, or
    one noise chunk of a sequential run); label_name is the clean answer. Every query counts
    in `n`, so an answer without a label counts against every class."""
    votes = Counter(q["top_label"] for q in chosen if _present(q.get("top_label")))
    classes = sorted(votes)
    return VoteRow(
        run_id=run_id, image_id=int(clean["image_id"]), image_name=clean.get("image_name"), label=-1,
        label_name=clean["top_label"] if _present(clean.get("top_label")) else None, phase=phase, n=len(chosen),
        classes=classes, counts=[votes[c] for c in classes], sigma=float(identity["sigma"]),
        seed=int(identity["seed"]), chunk_size=int(identity["chunk_size"]), model=_model_name(identity),
        model_sha256=None, denoiser=identity.get("denoiser"), denoiser_sha256=identity.get("denoiser_sha256"),
        worker="certify-api", elapsed_s=float(sum(float(q.get("latency_s") or 0.0) for q in chosen)),
        finished_at=max(_timestamp(q.get("answered_at")) for q in chosen), chunk=chunk,
    )


def votes_from_queries(run_dir: str | Location, n0: int | None = None, n: int | None = None) -> list[VoteRow]:
    """Vote rows for every image whose first n0 selection and n estimation samples (and
    clean query) are answered; n0/n default to the run's, and may not exceed them."""
    record = read_run_record(run_dir)
    identity, run_id = record["identity"], record["run_id"]
    n0 = int(identity["n0"]) if n0 is None else int(n0)
    n = int(identity["n"]) if n is None else int(n)
    if not 1 <= n0 <= int(identity["n0"]) or not 1 <= n <= int(identity["n"]):
        raise ValueError(f"n0={n0}, n={n}: must lie in [1, run's n0={identity['n0']}] and [1, run's n={identity['n']}]")
    frame = read_query_log(run_dir)
    rows: list[VoteRow] = []
    for _, group in frame.groupby("image_id", sort=True):
        image_rows = answer_vote_rows(group.to_dict("records"), identity, run_id, n0, n)
        if image_rows is not None:
            rows.extend(image_rows)
    return rows


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and pd.isna(value))


def _timestamp(value: Any) -> datetime:
    if value is None or (not isinstance(value, (datetime, str)) and pd.isna(value)):
        return datetime.now(timezone.utc)
    return pd.Timestamp(value).to_pydatetime()


def _model_name(identity: Mapping[str, Any]) -> str:
    provider = str(identity.get("provider"))
    if identity.get("openai_model"):  # a chat model: its name and its prompt's (tables, figures)
        return f"api:{provider}:{identity['openai_model']}:prompt-{identity.get('prompt_sha256')}"
    detail = identity.get("clarifai_model") or identity.get("azure_api_version")
    return f"api:{provider}" + (f":{detail}" if detail else "")
