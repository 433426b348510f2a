"""How many GPUs one certify driver keeps busy, and how many objects a run writes.

    python benchmarks/scale.py --actors 16 --samples-per-s 3000 --images 400 --sequential --output /tmp/scale
    python benchmarks/scale.py --actors 16 --samples-per-s 3000 --images 400 --output s3://bucket/run   # moto

What runs for real: `dsmooth certify`'s own wiring (`jobs.certify`'s fixed or sequential
schedule, `pipeline.certify.run.CertifyRun`, `actors.model_sampler.ModelSampler`'s submit and
take, `actors.pool.WorkPool`), the run directory, its lease and the Parquet writer. What is
simulated: the samplers. Each is a Ray actor that "computes" a request in samples / rate
seconds of sleep (no CPU, so 2 cores stand in for many GPUs) and returns counts drawn from
the image's p_A -- Binomial(n, p_A) for the label, the rest for another class -- with a
generator seeded by the chunk's noise address (seed, image, phase, chunk), so a chunk drawn
twice gives the same votes, as on a GPU. p_A comes from a mix of clear (p_A ~ U(0.97, 1)),
borderline (U(0.85, 0.95)) and hopeless (U(0.1, 0.6)) images.

The simulated GPUs run in a few Ray actor processes (`--hosts`), at the driver's own
priority (Ray starts workers at nice 19, where on a busy machine they would wait for the CPU
and the figures would measure that wait, not the driver). Like a model actor, whose module
imports torch and the request class before it answers its readiness ping, they load them in
their constructor: the clock starts with every actor ready to count.

An `s3://` output is served by moto on 127.0.0.1 (a server process of its own, so its CPU
is not the driver's): every object a run writes is a PUT there.

Figures (the table, then one line):
  utilisation  time the samplers were busy within the wall / (actors x wall)
  idle share   where the rest went, per actor: before its first call (start-up), between
               calls (steady), after its last call (tail: the last images' chains)
  driver CPU   this process's CPU time / wall (Ray's client threads and the writer included)
  parts        vote parts (Parquet files) the run wrote; `parts per image` = parts / images
  objects      everything written into the run directory (parts, manifests, run.json, lease)
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIX = (("clear", 0.5, 0.97, 1.0), ("borderline", 0.3, 0.85, 0.95), ("hopeless", 0.2, 0.1, 0.6))
NUM_CLASSES = 10
PHASE_CODE = {"selection": 0, "estimation": 1, "prediction": 2}


def p_mix(images: int, seed: int) -> np.ndarray:
    """Each image's p_A (the label's vote probability), from the clear/borderline/hopeless mix."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(len(MIX), size=images, p=[share for _, share, _, _ in MIX])
    low = np.array([MIX[k][2] for k in kinds])
    high = np.array([MIX[k][3] for k in kinds])
    return rng.uniform(low, high)


def simulated_counts(request: Any, p: float, label: int) -> np.ndarray:
    """Votes of one request, a function of its noise address alone."""
    counts = np.zeros(NUM_CLASSES, dtype=np.int64)
    for chunk in request.chunks():
        rng = np.random.default_rng([request.seed, request.image_id, PHASE_CODE[request.phase], chunk.index])
        hits = int(rng.binomial(chunk.size, p))
        counts[label] += hits
        counts[(label + 1) % NUM_CLASSES] += chunk.size - hits
    return counts


def _host_class() -> Any:
    import asyncio

    import ray
    from ray import cloudpickle

    if __name__ != "__main__":  # imported (a test): actors get this module by value, importable or not
        cloudpickle.register_pickle_by_value(sys.modules[__name__])

    @ray.remote(num_cpus=0, max_concurrency=1000)
    class SimulatedGPUs:
        """Several simulated GPUs in one process (2 cores cannot host a process per GPU):
        each draws `rate` samples a second, one call at a time, as a GPU actor does."""

        def __init__(self, first: int, gpus: int, rate: float, p: np.ndarray, niceness: int) -> None:
            try:  # Ray starts workers at nice 19: on a busy machine a "GPU" would wait for the CPU
                os.setpriority(os.PRIO_PROCESS, 0, niceness)
            except OSError:
                pass
            import pipeline.sampling.noise  # noqa: F401 - as a model actor's module: torch and the request
            # class loaded before the actor answers its ping, not inside the first call's wall

            self.rate, self.p = rate, p
            self.locks = {first + g: asyncio.Lock() for g in range(gpus)}
            self.running: dict[int, float] = {}  # gpu -> start of its call now running
            self.spans: dict[int, list[tuple[float, float]]] = {first + g: [] for g in range(gpus)}

        async def describe(self, gpu: int) -> dict[str, Any]:
            return {"worker": f"sim-{gpu}@{os.getpid()}"}

        async def count(self, gpu: int, requests: Any, images: Any, progress: Any = None, key: Any = None) -> tuple:
            async with self.locks[gpu]:
                started = self.running[gpu] = time.perf_counter()
                counts = np.stack([simulated_counts(r, float(self.p[r.image_id]), r.image_id % NUM_CLASSES)
                                   for r in requests])
                samples = sum(r.num_samples for r in requests)
                await asyncio.sleep(max(0.0, samples / self.rate - (time.perf_counter() - started)))
                ended = time.perf_counter()
                del self.running[gpu]
                self.spans[gpu].append((started, ended))  # perf_counter: the machine's monotonic clock
            return counts, ended - started, f"sim-{gpu}@{os.getpid()}"

        async def busy_spans(self) -> dict[int, list[tuple[float, float]]]:
            """Each GPU's (start, end) of every call, on the clock all processes of a machine share."""
            now = time.perf_counter()  # and the calls running now, until now
            return {gpu: calls + ([(self.running[gpu], now)] if gpu in self.running else [])
                    for gpu, calls in self.spans.items()}

    return SimulatedGPUs


class _Method:
    def __init__(self, host: Any, name: str, gpu: int) -> None:
        self.method, self.gpu = getattr(host, name), gpu

    def remote(self, *args: Any) -> Any:
        return self.method.remote(self.gpu, *args)


class SimulatedGPU:
    """What the pool holds for one actor: `count` and `describe` calls to one GPU of a host."""

    def __init__(self, host: Any, gpu: int) -> None:
        self.count, self.describe = _Method(host, "count", gpu), _Method(host, "describe", gpu)


def start_gpus(actors: int, hosts: int, rate: float, p: np.ndarray) -> tuple[list[Any], list[SimulatedGPU]]:
    """`actors` simulated GPUs spread over `hosts` Ray actor processes."""
    cls = _host_class()
    per_host = -(-actors // hosts)
    host_list, gpus = [], []
    for first in range(0, actors, per_host):
        count = min(per_host, actors - first)
        host = cls.remote(first, count, rate, p, os.getpriority(os.PRIO_PROCESS, 0))
        host_list.append(host)
        gpus += [SimulatedGPU(host, first + g) for g in range(count)]
    return host_list, gpus


@dataclass(frozen=True)
class Record:
    image_id: int
    name: str
    label: int


class Selection:
    """What `jobs.certify`'s schedules and the model sampler ask of a data selection."""

    def __init__(self, images: int) -> None:
        self.records = [Record(i, f"sim-{i:06d}", i % NUM_CLASSES) for i in range(images)]
        self.name = "simulated"
        self.classes = [f"class-{c}" for c in range(NUM_CLASSES)]

    def __len__(self) -> int:
        return len(self.records)


def sampler_class() -> Any:
    from actors.model_sampler import ModelSampler

    class SimulatedModelSampler(ModelSampler):
        """`ModelSampler` (its submit, take and drive: the real per-item path) over
        simulated actors started beforehand (so the clock starts with every actor ready)."""

        def __init__(self, context: Any, selected: Any, actors: list[Any], per_chunk: bool) -> None:
            from pipeline.certify.pair import ModelIdentity, PairInfo

            info = PairInfo(ModelIdentity("simulated", "0" * 64), None, NUM_CLASSES, None)
            super().__init__(context, selected, None, None, info, None, per_chunk)
            self.actors = actors
            self.sent: dict[int, float] = {}
            self.round_trips: list[float] = []  # submit to result, per call
            self.in_flight_seen: list[int] = []  # calls out when a result came back

        def __enter__(self) -> Any:
            import ray

            from actors.pool import Demand, WorkPool
            from actors.driver_side import start_progress_counter

            self.counter = start_progress_counter()
            ray.get(self.counter.totals.remote())  # up before the clock starts, as the actors
            self.demand = Demand(len(self.actors), 0.0, 0.0)
            self.pool = WorkPool(lambda index: self.actors[index], self.demand, wait_timeout_s=60)
            return self

        def __exit__(self, *_: object) -> None:
            import ray

            ray.kill(self.counter)

        def read(self, row: int) -> Any:
            return np.zeros((32, 32, 3), dtype=np.uint8)

        def submit(self, work: Any, pixels: Any) -> Any:
            items, ready = super().submit(work, pixels)
            self.sent[self._key - 1] = time.perf_counter()
            return items, ready

        def take(self, key: Any, result: Any) -> Any:
            self.round_trips.append(time.perf_counter() - self.sent.pop(key))
            self.in_flight_seen.append(len(self.pool._refs) + 1)
            return super().take(key, result)

    return SimulatedModelSampler


# -- counting what the driver does -----------------------------------------------------------------


class Meter:
    """Seconds and calls of the driver's steps, and every write into the run directory."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.round_trip_s = self.in_flight = self.empty_call_s = 0.0
        self.slots = 0

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.calls[name] = self.calls.get(name, 0) + 1

    def wrap(self, owner: Any, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - started)

        setattr(owner, attribute, timed)

    def wrap_generator(self, owner: Any, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            iterator = original(*args, **kwargs)
            while True:
                started = time.perf_counter()
                try:
                    item = next(iterator)
                except StopIteration:
                    self.add(name, time.perf_counter() - started)
                    return
                self.add(name, time.perf_counter() - started)
                if item is None:
                    self.add("nothing to send", 0.0)
                yield item

        setattr(owner, attribute, timed)


@contextmanager
def counted_writes(meter: Meter) -> Any:
    """Count every object written (Location.write_bytes: parts, manifests, run.json) and every
    lease PUT (acquire, renewals), restoring both afterwards."""
    from pipeline.runs.fs import Location
    from pipeline.runs.lock import RunLease

    originals = Location.write_bytes, RunLease._renew, RunLease._acquire_lease
    meter.wrap(Location, "write_bytes", "PUT object")
    meter.wrap(RunLease, "_renew", "PUT lease")
    meter.wrap(RunLease, "_acquire_lease", "PUT lease")
    try:
        yield
    finally:
        Location.write_bytes, RunLease._renew, RunLease._acquire_lease = originals


@contextmanager
def moto_server() -> Any:
    """An S3 server on 127.0.0.1 in a process of its own; the environment points S3 clients at it."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = ("import logging, time\nlogging.getLogger('werkzeug').setLevel(logging.WARNING)\n"
            "from moto.server import ThreadedMotoServer\n"
            f"ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False).start()\n"
            "time.sleep(86400)\n")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_REGION")}
    os.environ.update({"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "scale-bench",
                       "AWS_SECRET_ACCESS_KEY": "scale-bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_REGION": "us-east-1"})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.2)
        yield
    finally:
        server.terminate()
        server.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- one run -------------------------------------------------------------------------------------


def idle_shares(spans: list[list[tuple[float, float]]], started: float, ended: float) -> dict[str, float]:
    """Where the samplers' idle time went, as shares of actors x wall (with utilisation they
    sum to 1): `start-up` before an actor's first call began, `steady` between its calls,
    `tail` after its last call ended (the last images' chunks, each waiting on a decision)."""
    wall = max(1e-9, (ended - started) * len(spans))
    startup = steady = tail = 0.0
    for calls in spans:
        calls = sorted((max(a, started), min(b, ended)) for a, b in calls if b > started and a < ended)
        if not calls:
            startup += ended - started
            continue
        startup += calls[0][0] - started
        steady += sum(max(0.0, nxt[0] - prev[1]) for prev, nxt in itertools.pairwise(calls))
        tail += ended - calls[-1][1]
    return {"start-up": startup / wall, "steady": steady / wall, "tail": tail / wall}


@dataclass
class Result:
    actors: int
    images: int
    wall_s: float
    busy_s: float
    driver_cpu_s: float
    calls: int
    samples: int
    parts: int
    objects: int
    puts: int
    decided: int
    meter: Meter
    idle: dict[str, float] = field(default_factory=dict)
    spans: list[list[tuple[float, float]]] = field(default_factory=list)  # per actor, (start, end) from the run's start

    @property
    def utilisation(self) -> float:
        return self.busy_s / max(1e-9, self.actors * self.wall_s)

    @property
    def driver_cpu(self) -> float:
        return self.driver_cpu_s / max(1e-9, self.wall_s)


def config_of(args: argparse.Namespace) -> Any:
    """The `certify` settings of a benchmark run (a simulated classifier and data set)."""
    from pipeline.certify.config import CertifyConfig

    sequential = {"sequential": True, "radius": 0.25} if args.sequential else {}
    return CertifyConfig(classifier="simulated", dataset="cifar10", data_root="simulated", output=args.output,
                         sigma=0.25, n0=args.n0, n=args.n, seed=args.seed, batch_size=args.batch, **sequential)


def run_once(args: argparse.Namespace, before_run: Any = None) -> Result:
    """One run (or the resumption of one) into args.output; `before_run(run)` may wrap the
    `CertifyRun` before it starts (tests interrupt it)."""
    import ray

    config = config_of(args)
    selected = Selection(args.images)
    p = p_mix(args.images, args.seed)
    hosts, actors = start_gpus(args.actors, args.hosts or max(1, -(-args.actors // 8)), args.samples_per_s, p)
    ray.get([a.describe.remote() for a in actors])  # every actor up before the clock starts
    started = time.perf_counter()
    for _ in range(20):  # this machine's Ray round trip now, for an empty call
        ray.get(actors[0].describe.remote())
    empty_call_s = (time.perf_counter() - started) / 20

    try:
        result = _measure(args, config, selected, hosts, actors, before_run)
        result.meter.empty_call_s = empty_call_s
        return result
    finally:
        for host in hosts:
            ray.kill(host)


def _measure(args: argparse.Namespace, config: Any, selected: Selection, hosts: list[Any], actors: list[Any],
             before_run: Any) -> Result:
    import ray

    from jobs.certify import _fixed_schedule, _sequential_schedule, model_run
    from pipeline.certify.run import RunContext, SequentialSchedule, claimed_run
    from pipeline.runs.fs import Location
    from pipeline.runs.identity import sequential_identity
    from pipeline.runs.storage import VOTES, open_run

    meter = Meter()
    with counted_writes(meter), claimed_run(config.output, "scale benchmark") as lease:
        identity = {"job": "scale-benchmark", "sigma": config.sigma, "n0": config.n0, "n": config.n,
                    "seed": config.seed, "chunk_size": config.chunk_size, "images": args.images,
                    **sequential_identity(config)}
        output = Location.of(config.output)
        record = open_run(output, identity)
        context = RunContext(output, record, selected.records, lease, config, "fail")
        schedule, _ = (_sequential_schedule if config.sequential else _fixed_schedule)(config, context, output,
                                                                                    selected)
        if schedule is None:
            raise SystemExit(f"{output} holds a finished run: give a new --output")
        sampler_type = sampler_class()
        with sampler_type(context, selected, actors, per_chunk=config.sequential) as sampler:
            if args.in_flight:
                sampler.pool.per_actor = args.in_flight
            run = model_run(config, context, sampler, schedule, progress=_Quiet())
            schedule = run.schedule
            if isinstance(schedule, SequentialSchedule) and args.item_seconds:
                schedule.item_seconds, schedule.least_seconds = args.item_seconds, args.item_seconds / 4
            if args.unbatched:  # as before batched parts and paced items: one part per item, fixed item size
                run.write_every_s = 0.0
                if isinstance(schedule, SequentialSchedule):
                    schedule.slots, schedule.item_seconds = 1, None
            meter.wrap(sampler, "submit", "submit")
            meter.wrap(sampler, "take", "take")
            meter.wrap(schedule, "accept", "schedule accept")
            meter.wrap_generator(schedule, "items", "schedule next")
            if before_run is not None:
                before_run(run)
            started, cpu = time.perf_counter(), time.process_time()
            run.run()
            ended = time.perf_counter()
            wall, cpu = ended - started, time.process_time() - cpu
            meter.round_trip_s = float(np.mean(sampler.round_trips)) if sampler.round_trips else 0.0
            meter.in_flight = float(np.mean(sampler.in_flight_seen)) if sampler.in_flight_seen else 0.0
            meter.slots = len(actors) * sampler.pool.per_actor
        spans = [calls for host in ray.get([h.busy_spans.remote() for h in hosts]) for calls in host.values()]
        busy = sum(min(b, ended) - max(a, started) for calls in spans for a, b in calls if b > started and a < ended)
        parts = len(VOTES.parts(output))
        objects = len(output.files(recursive=True))
    return Result(len(actors), args.images, wall, busy, cpu, meter.calls.get("take", 0), run.samples, parts,
                  objects, meter.calls.get("PUT object", 0) + meter.calls.get("PUT lease", 0), run.finished, meter,
                  idle_shares(spans, started, ended), [[(a - started, b - started) for a, b in c] for c in spans])


class _Quiet:
    """A progress display that shows nothing (the benchmark prints its own figures)."""

    total = 0

    def set(self, *_: Any) -> None:
        pass

    def close(self) -> None:
        pass


def meter_ms(seconds: float) -> str:
    return f"{1000 * seconds:.0f}"


def report(args: argparse.Namespace, result: Result) -> str:
    m = result.meter
    calls = max(1, result.calls)
    per_call = lambda name: 1000 * m.seconds.get(name, 0.0) / calls
    rows = [
        ("mode", ("sequential" if args.sequential else "fixed") + (", unbatched" if args.unbatched else "")),
        ("output", "s3 (moto)" if args.output.startswith("s3://") else "local disk"),
        ("actors x samples/s", f"{args.actors} x {args.samples_per_s:g}"),
        ("images (finished by this run)", f"{args.images} ({result.decided})"),
        ("samples drawn", f"{result.samples:,} ({result.samples / max(1, args.images):,.0f} per image)"),
        ("actor calls", (f"{result.calls:,} ({result.calls / result.wall_s:.1f}/s, "
                        f"{result.samples / calls:,.0f} samples, {result.busy_s / calls:.3f} s each)")),
        ("round trip per call (compute)", f"{meter_ms(m.round_trip_s)} ms ({1000 * result.busy_s / calls:.0f} ms)"),
        ("Ray round trip of an empty call", f"{meter_ms(m.empty_call_s)} ms"),
        ("calls in flight at a result", f"{m.in_flight:.1f} of {m.slots}"),
        ("nothing to send (waits for a result)", f"{m.calls.get('nothing to send', 0)}"),
        ("driver ms per call: submit", f"{per_call('submit'):.2f}"),
        ("driver ms per call: take", f"{per_call('take'):.2f}"),
        ("driver ms per call: schedule next", f"{per_call('schedule next'):.2f}"),
        ("driver ms per call: schedule accept", f"{per_call('schedule accept'):.2f}"),
        ("driver ms per call: writes", (f"{1000 * m.seconds.get('PUT object', 0.0) / calls:.2f} "
                                      f"({m.calls.get('PUT object', 0)} objects)")),
        ("driver CPU ms per call (all)", f"{1000 * result.driver_cpu_s / calls:.2f}"),
        ("lease PUTs", f"{m.calls.get('PUT lease', 0)}"),
        ("PUTs per 1,000 images", f"{1000 * result.puts / max(1, args.images):,.0f}"),
        ("load average (1 min) at the end", f"{os.getloadavg()[0]:.2f}"),
        ("idle share: start-up | steady | tail", " | ".join(f"{100 * result.idle.get(k, 0.0):.1f}%"
                                                           for k in ("start-up", "steady", "tail"))),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines.append(f"utilisation {100 * result.utilisation:.1f}% | driver CPU {100 * result.driver_cpu:.1f}% | "
                 f"parts per image {result.parts / max(1, args.images):.2f} | objects written {result.objects} | "
                 f"wall {result.wall_s:.1f} s")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--actors", type=int, default=4, help="simulated GPUs (Ray actors)")
    parser.add_argument("--samples-per-s", type=float, default=3000.0, help="samples a second of each")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--hosts", type=int, default=0,
                        help="Ray actor processes the simulated GPUs share (default: one per 8 GPUs)")
    parser.add_argument("--sequential", action="store_true")
    parser.add_argument("--output", required=True, help="a new run directory: a local path or s3://bucket/prefix")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=100_000, help="fixed n, or a sequential run's n_max (the job's default)")
    parser.add_argument("--batch", type=int, default=400, help="the certify --batch (sizes sequential items)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--item-seconds", type=float, default=0.0,
                        help="a sequential item's seconds of work, at least a quarter of it (default: the job's, "
                             "pipeline.certify.run.item_seconds)")
    parser.add_argument("--in-flight", type=int, default=0,
                        help="calls in flight per actor (default: the pool's, 2)")
    parser.add_argument("--unbatched", action="store_true",
                        help="the driver as it was: one vote part per actor call, sequential items of a fixed size")
    args = parser.parse_args(argv)
    if args.actors < 1 or args.samples_per_s <= 0 or args.images < 1:
        parser.error("--actors, --samples-per-s and --images must be positive")
    return args


def main(argv: list[str] | None = None) -> str:
    import logging

    import ray

    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        if args.output.startswith("s3://"):
            with moto_server():
                import boto3

                boto3.client("s3").create_bucket(Bucket=args.output[5:].split("/")[0])
                result = run_once(args)
        else:
            result = run_once(args)
    finally:
        if started_ray:
            ray.shutdown()
    text = report(args, result)
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
