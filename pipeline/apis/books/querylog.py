"""The books of `certify-api`, read: every call an API run sent, with its answer, from the
call journal and its compacted Parquet parts; the per-query view that resume, votes and
reports use; and what the run spent.

Paid answers are the expensive part of an API certification, so every one is kept with the
full label list and scores; vote counts, certificates at another alpha, or with a smaller
n0/n, are recomputed from this log without a new query
(`pipeline.apis.run.state.votes_from_queries`). A query with an `ok` answer is never asked
again; one whose calls all failed (malformed answers included, after every retry) is asked
again by a later run.

The journal and this log are one record of the same calls, in two forms: the journal is
written by the ledger (`pipeline.apis.books.ledger`: every call before it is sent and when it
is answered, so a kill never loses or repeats a paid answer) and read back here; calls live
first in it, then, once their invocation has ended, in `RUN/queries/part-*.parquet` parts of at most PART_CALLS calls each, each
with a manifest of its images: a damaged part costs those images' answers, named in the
error, never the whole log -- and never the record of what was spent: `RUN/spend.json` keeps
each invocation's calls, and a figure recomputed from the log never goes below it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd
import pyarrow as pa

from pipeline.apis.books.ledger import JOURNAL_DIR, billable
from pipeline.apis.query import OK
from pipeline.runs.fs import Location, StorageError
from pipeline.runs.storage import PartStream, write_json

log = logging.getLogger("dsmooth")

QUERIES_DIR = "queries"
SPEND_FILE = "spend.json"  # what each invocation sent and owes (spend_record)
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
        ("billable", pa.bool_()),  # what the provider bills (pipeline.apis.books.ledger.billable)
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
            row["billable"] = billable(None)
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
    live = calls_from_records(replay_calls(run_dir))
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
    finished = [s for s in segments(run_dir)
                if keep_invocation is None or f"-{keep_invocation}-" not in s.name]
    if not finished:
        return 0
    rows = calls_from_records(r for s in finished for r in read_segment(s))
    rows.sort(key=lambda row: (row["image_id"], row.get("phase", ""), row.get("sample", 0), row["call"]))
    for start in range(0, len(rows), PART_CALLS):
        CALLS.write(run_dir, [_normalise(row) for row in rows[start : start + PART_CALLS]], worker="compact")
    for segment in finished:
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


# -- the journal, read back (pipeline.apis.books.ledger.Journal writes it) ---------------------


def segments(run: str | Location) -> list[Location]:
    folder = Location.of(run) / JOURNAL_DIR
    return [s for s in folder.files() if s.name.startswith("seg-") and s.name.endswith(".jsonl")]


def read_segment(segment: Location) -> list[dict[str, Any]]:
    """The records of one segment; a torn last line (crash mid-append) is dropped."""
    records = []
    lines = segment.read_bytes().split(b"\n")
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number >= len(lines) - 2:  # the last, unterminated line
                log.debug("%s: ignoring a torn last record", segment)
                continue
            raise StorageError(
                f"{segment} is damaged at line {number + 1}; the calls it recorded cannot be read. Move it "
                "aside and rerun: answers in it are asked (and paid) again"
            ) from None
    return records


def replay_calls(run: str | Location) -> Iterator[dict[str, Any]]:
    """Every record of every segment, in segment order."""
    for segment in segments(run):
        yield from read_segment(segment)
