"""A pool of actors that runs shards of work, keeps each actor busy, and survives actor loss.

Ray restarts a crashed actor and retries its call on its own (max_restarts /
max_task_retries). When that is exhausted -- the actor died for good, or its node is gone --
the pool starts a replacement and resubmits every shard the dead actor held. Work goes only
to actors that have answered a ping, so an actor waiting for a GPU node the autoscaler has
not started yet holds no shards hostage. An error raised by the work itself (bad input) is
not retried: it is the same on every actor.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

Submit = Callable[[Any], "ray.ObjectRef"]  # actor handle -> ref of its result


class ShardFailed(Exception):
    """The work of `key` raised `cause` inside an actor (not an actor crash)."""

    def __init__(self, key: Any, cause: BaseException) -> None:
        super().__init__(f"shard {key}: {cause}")
        self.key = key
        self.cause = cause


@dataclass
class _Job:
    key: Any
    submit: Submit
    attempts: int = 0


@dataclass
class _Slot:
    actor: Any
    ready: bool = False
    ping: Any = None
    running: set = field(default_factory=set)  # refs of jobs in flight on this actor
    failures: int = 0


class ShardPool:
    """`per_actor` jobs in flight on each ready actor; results in completion order."""

    def __init__(
        self,
        start_actor: Callable[[int], Any],
        num_actors: int,
        *,
        per_actor: int = 2,
        max_attempts: int = 3,
        ping: Callable[[Any], "ray.ObjectRef"] = lambda actor: actor.describe.remote(),
        log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
        wait_note_s: float = 60.0,
    ) -> None:
        self._start_actor = start_actor
        self._ping = ping
        self._log = log
        self.per_actor = per_actor
        self.max_attempts = max_attempts
        self.wait_note_s = wait_note_s
        self._slots: dict[int, _Slot] = {}
        self._jobs: dict[Any, tuple[int, _Job]] = {}  # ref -> (slot index, job)
        self._queue: deque[_Job] = deque()
        self.actor_info: dict[int, Any] = {}
        self._last_note = time.monotonic()
        for index in range(num_actors):
            self._launch(index)

    # -- actors ---------------------------------------------------------------------------

    def _launch(self, index: int) -> None:
        failures = self._slots[index].failures if index in self._slots else 0
        actor = self._start_actor(index)
        self._slots[index] = _Slot(actor=actor, ping=self._ping(actor), failures=failures)

    def _replace(self, index: int, error: BaseException) -> None:
        """Start a fresh actor for slot `index` and put its unfinished jobs back in the queue."""
        if isinstance(error, RayActorError) and error.actor_init_failed:
            # __init__ raised (e.g. the model does not load there): the same on every retry.
            raise RuntimeError(f"actor {index} could not start: {_last_line(error)}") from None
        slot = self._slots[index]
        slot.failures += 1
        lost = [self._jobs.pop(ref)[1] for ref in list(slot.running)]
        self._queue.extendleft(reversed(lost))
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead is fine
            pass
        if slot.failures > self.max_attempts:
            raise RuntimeError(
                f"actor {index} was lost {slot.failures} times without finishing a shard; last error: {_short(error)}"
            )
        self._log(f"actor {index} lost ({_short(error)}); starting a replacement, resubmitting {len(lost)} shard(s)")
        self._launch(index)

    def shutdown(self) -> None:
        for slot in self._slots.values():
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass

    # -- jobs -----------------------------------------------------------------------------

    def has_capacity(self) -> bool:
        """True when a ready actor has a free slot and nothing waits for resubmission."""
        return not self._queue and any(s.ready and len(s.running) < self.per_actor for s in self._slots.values())

    def any_ready(self) -> bool:
        return any(s.ready for s in self._slots.values())

    def submit(self, key: Any, submit: Submit) -> None:
        self._queue.append(_Job(key, submit))
        self._dispatch()

    def busy(self) -> bool:
        return bool(self._jobs or self._queue)

    def _dispatch(self) -> None:
        while self._queue:
            ready = [(len(s.running), i) for i, s in self._slots.items() if s.ready and len(s.running) < self.per_actor]
            if not ready:
                return
            _, index = min(ready)
            job = self._queue.popleft()
            job.attempts += 1
            if job.attempts > self.max_attempts:
                raise RuntimeError(f"shard {job.key} failed {self.max_attempts} times on lost actors; giving up")
            ref = job.submit(self._slots[index].actor)
            self._slots[index].running.add(ref)
            self._jobs[ref] = (index, job)

    def next_result(self, timeout_s: float | None = None) -> tuple[Any, Any] | None:
        """(key, result) of the next finished job; None when `timeout_s` passed first or an
        actor answered its ping (it may take work now).

        Raises ShardFailed for an error raised by the job itself.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            pings = {s.ping: i for i, s in self._slots.items() if s.ping is not None}
            refs = list(self._jobs) + list(pings)
            if not refs:
                return None
            wait_s = 5.0 if deadline is None else max(0.0, min(5.0, deadline - time.monotonic()))
            done, _ = ray.wait(refs, num_returns=1, timeout=wait_s)
            if not done:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                if not self.any_ready() and time.monotonic() - self._last_note > self.wait_note_s:
                    self._last_note = time.monotonic()
                    self._log(f"waiting for actors to start (none ready yet; {_resources()})")
                continue
            ref = done[0]
            if ref in pings:
                self._on_ping(pings[ref], ref)
                return None  # an actor may have become ready: let the caller feed it
            index, job = self._jobs.pop(ref)
            self._slots[index].running.discard(ref)
            try:
                result = ray.get(ref)
            except (RayActorError, ActorUnavailableError) as error:
                self._jobs[ref] = (index, job)  # let _replace requeue it with the others
                self._slots[index].running.add(ref)
                self._replace(index, error)
                self._dispatch()
                continue
            except RayTaskError as error:
                self._dispatch()
                raise ShardFailed(job.key, _cause(error)) from None
            self._slots[index].failures = 0  # it works: only losses without progress count
            self._dispatch()
            return job.key, result

    def _on_ping(self, index: int, ref: Any) -> None:
        slot = self._slots[index]
        slot.ping = None
        try:
            self.actor_info[index] = ray.get(ref)
        except (RayActorError, ActorUnavailableError) as error:
            self._replace(index, error)
            return
        slot.ready = True
        self._dispatch()


def _cause(error: RayTaskError) -> BaseException:
    """The exception the remote code raised, as its own type when Ray can rebuild it."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def _last_line(error: BaseException) -> str:
    """The innermost message of a remote traceback (the exception line itself)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(error).__name__


def _resources() -> str:
    try:
        return f"cluster has {ray.cluster_resources()}, free {ray.available_resources()}"
    except Exception:  # noqa: BLE001
        return "cluster resources unknown"
