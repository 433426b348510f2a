"""The one scheduler of dsmooth's jobs: work items over a pool of Ray actors that survives
actor crashes and node loss, and fails fast when its actors can never be placed.

Why not Ray Data's `map_batches` with an actor pool (benchmarks/scheduler_spike.py compares
both): results must be written as atomic parts the moment each item finishes (resume is per
item), an item must never be re-executed behind our back (an API item is paid per query, and
Ray Data re-runs lost tasks through lineage reconstruction), and a job must stop feeding
work at once when a budget runs out or the input turns out bad. So the pool uses Ray's own
machinery for what it does well -- actor placement and process restarts (`max_restarts`) --
and keeps by hand only what none of it does: which item runs where, and what to resubmit.

Rules:
- items go only to actors that have answered a ping, so an actor waiting for a node that
  does not exist yet holds no items hostage;
- when an actor dies (crash, OOM, node lost), every item it held goes back to the queue at
  once and runs on the next free actor; the dead actor is restarted by Ray (or replaced
  when Ray gives up) and takes work again after its next ping. A restart that can never be
  placed (its node is gone and no other has room) just leaves the other actors working;
- an exception raised by the item's own code is not retried (it is the same everywhere):
  `WorkFailed` carries it to the caller;
- when no actor has become ready after `wait_timeout_s`, the pool raises `PlacementError`
  with the reason in plain words, unless an autoscaler node type could still host one.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from pipeline.errors import Refused

log = logging.getLogger("dsmooth")

Submit = Callable[[Any], "ray.ObjectRef"]  # actor handle -> ref of its result


class WorkFailed(Exception):
    """The item `key` raised `cause` inside an actor (not an actor crash)."""

    def __init__(self, key: Any, cause: BaseException) -> None:
        super().__init__(f"{key}: {cause}")
        self.key = key
        self.cause = cause


class PlacementError(Refused):
    """The pool's actors cannot be placed on this cluster."""


@dataclass(frozen=True)
class Demand:
    """What one actor asks of a node."""

    actors: int
    cpus: float
    gpus: float
    custom: tuple[tuple[str, float], ...] = ()

    def resources(self) -> dict[str, float]:
        wanted = {"CPU": self.cpus, "GPU": self.gpus, **dict(self.custom)}
        return {k: v for k, v in wanted.items() if v > 0}

    def __str__(self) -> str:
        parts = [f"{v:g} {k}" for k, v in self.resources().items()] or ["no resources"]
        return f"{self.actors} actor(s) x {' + '.join(parts)}"


def placement_problem(demand: Demand) -> tuple[str | None, bool]:
    """(why no actor can be placed, or None; whether an autoscaler could still add a node)."""
    wanted = demand.resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if any(all(n.get("Resources", {}).get(k, 0.0) >= v for k, v in wanted.items()) for n in nodes):
        return None, False  # some node can host one: it is busy, not impossible
    totals = ray.cluster_resources()
    have = ", ".join(f"{totals.get(k, 0):g} {k}" for k in wanted) or "nothing"
    groups = _autoscaler_node_types()
    fitting = [name for name, resources in groups if all(resources.get(k, 0.0) >= v for k, v in wanted.items())]
    if fitting:
        return None, True
    where = "and no node type of its autoscaler offers one" if groups else "and it does not autoscale"
    return f"asked {demand}; no node of the cluster has that ({have} in total) {where}", False


def _autoscaler_node_types() -> list[tuple[str, dict[str, float]]]:
    """(name, resources) of the node types an autoscaler may launch; [] without autoscaler."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - internal API: no autoscaler information
        return []
    if config is None:
        return []
    return [(g.name, dict(g.resources)) for g in config.node_group_configs if g.max_count != 0]


@dataclass
class _Job:
    key: Any
    submit: Submit
    losses: int = 0


@dataclass
class _Slot:
    actor: Any
    ready: bool = False
    ping: Any = None
    running: dict = field(default_factory=dict)  # ref -> job
    losses: int = 0  # consecutive losses without finishing an item
    ping_at: float = 0.0  # when to ask a restarting actor again


class WorkPool:
    """`per_actor` items in flight on each ready actor; results in completion order."""

    def __init__(
        self,
        start_actor: Callable[[int], Any],
        demand: Demand,
        *,
        per_actor: int = 2,
        max_losses: int = 3,
        wait_timeout_s: float = 600.0,
        ping: Callable[[Any], ray.ObjectRef] = lambda actor: actor.describe.remote(),
        note_every_s: float = 60.0,
    ) -> None:
        self._start_actor = start_actor
        self._ping = ping
        self.demand = demand
        self.per_actor = per_actor
        self.max_losses = max_losses
        self.wait_timeout_s = wait_timeout_s
        self.note_every_s = note_every_s
        self._slots: dict[int, _Slot] = {}
        self._refs: dict[Any, int] = {}  # ref -> slot index
        self._queue: deque[_Job] = deque()
        self.actor_info: dict[int, Any] = {}
        self.lost = 0  # actor losses seen (for reports)
        self._started = time.monotonic()
        self._last_note = time.monotonic()
        self._told_partial = False
        self.on_requeue: Callable[[Any], None] | None = None  # an item goes back to the queue
        for index in range(demand.actors):
            self._launch(index)

    # -- actors ------------------------------------------------------------------------------

    def _launch(self, index: int, losses: int = 0) -> None:
        actor = self._start_actor(index)
        self._slots[index] = _Slot(actor=actor, ping=self._ping(actor), losses=losses)

    def _lose(self, index: int, error: BaseException) -> None:
        """The actor of `index` died: requeue what it held, then wait for Ray's restart."""
        if isinstance(error, RayActorError) and getattr(error, "actor_init_failed", False):
            raise RuntimeError(f"actor {index} could not start: {_last_line(error)}") from None
        slot = self._slots[index]
        lost = list(slot.running.values())
        for ref in slot.running:
            self._refs.pop(ref, None)
        slot.running.clear()
        self._queue.extendleft(reversed(lost))
        for job in lost:
            if self.on_requeue is not None:
                self.on_requeue(job.key)
            job.losses += 1
            if job.losses > self.max_losses:
                raise RuntimeError(f"item {job.key} was lost with its actor {job.losses} times; giving up")
        if slot.ready or slot.ping is None:
            self.lost += 1
            slot.losses += 1
            slot.ready = False
            log.warning("actor %d lost (%s); %d item(s) resubmitted to the other actors", index, _short(error), len(lost))
            if slot.losses > self.max_losses:
                raise RuntimeError(f"actor {index} was lost {slot.losses} times without finishing an item; "
                                   f"last error: {_short(error)}")
            slot.ping = self._ping(slot.actor)  # answers once Ray has restarted it

    def _replace(self, index: int, error: BaseException) -> None:
        """Ray gave up on the actor of `index` (restarts used up): start a fresh one."""
        slot = self._slots[index]
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead is fine
            pass
        if slot.losses > self.max_losses:
            raise RuntimeError(f"actor {index} was lost {slot.losses} times; last error: {_short(error)}")
        log.warning("actor %d is gone for good (%s); starting a replacement", index, _short(error))
        self._launch(index, losses=slot.losses)

    def shutdown(self) -> None:
        for slot in self._slots.values():
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass

    def ready_actors(self) -> int:
        return sum(s.ready for s in self._slots.values())

    # -- items -------------------------------------------------------------------------------

    def has_capacity(self) -> bool:
        """True when a ready actor has a free slot and nothing waits for resubmission."""
        return not self._queue and any(s.ready and len(s.running) < self.per_actor for s in self._slots.values())

    def submit(self, key: Any, submit: Submit) -> None:
        self._queue.append(_Job(key, submit))
        self._dispatch()

    def busy(self) -> bool:
        return bool(self._refs or self._queue)

    def abandon(self) -> int:
        """Forget every item queued or in flight: their results are no longer wanted (a sequential
        run whose images are all decided). The actors finish them unheard, until `shutdown`
        (Ray's cancel does not stop a call queued on a sync actor). Returns how many were dropped."""
        dropped = len(self._queue) + len(self._refs)
        self._queue.clear()
        for ref, index in self._refs.items():
            self._slots[index].running.pop(ref, None)
        self._refs.clear()
        return dropped

    def _dispatch(self) -> None:
        while self._queue:
            free = [(len(s.running), i) for i, s in self._slots.items() if s.ready and len(s.running) < self.per_actor]
            if not free:
                return
            _, index = min(free)
            job = self._queue.popleft()
            ref = job.submit(self._slots[index].actor)
            self._slots[index].running[ref] = job
            self._refs[ref] = index

    def next_result(self, timeout_s: float | None = None) -> tuple[Any, Any] | None:
        """(key, result) of the next finished item; None when `timeout_s` passed first or an
        actor became ready (it may take work now). Raises WorkFailed for an error of the item's
        own code, PlacementError when no actor can ever be placed."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            self._ping_restarting()
            pings = {s.ping: i for i, s in self._slots.items() if s.ping is not None}
            refs = list(self._refs) + list(pings)
            if not refs:
                return None
            wait_s = 5.0 if deadline is None else max(0.0, min(5.0, deadline - time.monotonic()))
            done, _ = ray.wait(refs, num_returns=1, timeout=wait_s)
            if not done:
                self._check_placement()
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            ref = done[0]
            if ref in pings:
                if self._on_ping(pings[ref], ref):
                    return None
                continue
            index = self._refs.pop(ref)
            job = self._slots[index].running.pop(ref)
            try:
                result = ray.get(ref)
            except (RayActorError, ActorUnavailableError) as error:
                self._slots[index].running[ref] = job
                self._refs[ref] = index
                self._lose(index, error)
                self._dispatch()
                continue
            except RayTaskError as error:
                self._dispatch()
                raise WorkFailed(job.key, _cause(error)) from None
            self._slots[index].losses = 0  # it works: only losses without progress count
            self._dispatch()
            return job.key, result

    def _on_ping(self, index: int, ref: Any) -> bool:
        slot = self._slots[index]
        slot.ping = None
        try:
            self.actor_info[index] = ray.get(ref, timeout=60)
        except RayActorError as error:
            if getattr(error, "actor_init_failed", False):
                raise RuntimeError(f"actor {index} could not start: {_last_line(error)}") from None
            self._replace(index, error)
            return False
        except (ActorUnavailableError, GetTimeoutError):
            slot.ping_at = time.monotonic() + 2.0  # still restarting: ask again soon
            return False
        slot.ready = True
        self._dispatch()
        return True

    def _ping_restarting(self) -> None:
        now = time.monotonic()
        for slot in self._slots.values():
            if not slot.ready and slot.ping is None and now >= slot.ping_at:
                slot.ping = self._ping(slot.actor)

    def _check_placement(self) -> None:
        """No actor ready after the wait timeout: explain why, or keep waiting if it can be."""
        if time.monotonic() - self._started < self.wait_timeout_s:
            return
        if self.ready_actors():
            if not self._told_partial and self.ready_actors() < len(self._slots):
                self._told_partial = True
                problem, _ = placement_problem(self.demand)
                log.warning("only %d of %d actors started within %.0f s%s; going on with them",
                            self.ready_actors(), len(self._slots), self.wait_timeout_s,
                            f" ({problem})" if problem else "")
            return
        problem, autoscaling = placement_problem(self.demand)
        if problem is not None:
            raise PlacementError(problem)
        if time.monotonic() - self._last_note >= self.note_every_s:
            self._last_note = time.monotonic()
            why = "the autoscaler can add a node type that offers them" if autoscaling else "the cluster is busy"
            log.info("waiting for %s to start (%s)", self.demand, why)


def drive(
    pool: WorkPool,
    items: Iterator[tuple[Any, Submit] | None],
    on_result: Callable[[Any, Any], bool | None],
    on_lost: Callable[[Any], None] | None = None,
    tick: Callable[[], None] | None = None,
    settled: Callable[[], bool] | None = None,
) -> BaseException | None:
    """Feed `items` to the pool as it has room and hand each result to `on_result` (which may
    return False to stop feeding new items); an item of None means "nothing to send now":
    the next one is asked for after the next result; drain what is in flight, then return the first
    error (an item's own exception, or a failure to produce the next item), if any.
    `tick()` runs about once a second (progress displays). `settled()` true after a result:
    nothing in flight is needed any more (every image decided), so it is abandoned rather
    than drained -- the run ends with its last decision, not with its actors' queues."""
    error: BaseException | None = None
    feeding = True
    wait_s = 1.0 if tick is not None else 5.0
    while True:
        if tick is not None:
            tick()
        while feeding and error is None and pool.has_capacity():
            try:
                item = next(items)
            except StopIteration:
                feeding = False
                break
            except Exception as failure:  # noqa: BLE001 - stop feeding, keep what is in flight
                error = failure
                break
            if item is None:  # nothing to send until a result comes back (sequential runs)
                break
            key, submit = item
            pool.submit(key, submit)
        if not pool.busy():
            if feeding and error is None:
                pool.next_result(timeout_s=1.0)  # no actor ready yet: wait on their pings
                continue
            return error
        try:
            outcome = pool.next_result(timeout_s=wait_s)
        except WorkFailed as failure:
            if on_lost is not None:
                on_lost(failure.key)
            error = error or failure.cause
            continue
        if outcome is None:
            continue
        if on_result(*outcome) is False:
            feeding = False
        if settled is not None and settled():
            pool.abandon()
            return error


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
