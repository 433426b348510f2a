"""One writer per run: a second job on the same run directory is refused at once.

Two jobs writing one run would both do all the work and leave duplicate rows (and, for an
API, pay every query twice). How exclusivity is held depends on the storage:

- local disk: an `fcntl.flock` on `RUN/.lock`, released by the kernel when the holder exits
  or dies, so it is never stale;
- S3: a *lease* object `RUN/.lock.json` created with a conditional write (`If-None-Match: *`,
  which S3 and compatible servers evaluate atomically) and renewed by a heartbeat with
  `If-Match: <etag>` (compare-and-swap). A lease not renewed for `lease_s` (its holder died)
  may be taken over, again by compare-and-swap. A holder whose renewal fails has lost the run
  and stops writing (`check()` raises). A holder that was paused (SIGSTOP, a suspended VM)
  may wake after its lease ran out and before its heartbeat notices: `check()` therefore
  compares the clock with the expiry of the lease it last wrote, and within EXPIRY_MARGIN of
  it renews at once (compare-and-swap) or raises -- so no write follows a lost lease;
- other object stores (gs://): the same lease, but written without a condition (pyarrow
  exposes none) and read back to confirm: best effort, two jobs starting in the same
  instant could both proceed. Said so in the README.

Lease expiry uses the holder's clock, so clocks must agree within the lease length.

Every write into a held run through pipeline.runs.storage (parts, manifests, run records)
calls `check_held` first, so a job cannot forget to check before it writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any, BinaryIO

from pipeline.errors import Refused
from pipeline.runs.fs import Location, check_writable

log = logging.getLogger("dsmooth")

LOCK_FILE = ".lock"
LEASE_FILE = ".lock.json"
# Seconds a lease lasts without renewal (renewed every third of it). DSMOOTH_LEASE_S changes
# it: longer for stores with slow or flaky writes, shorter in tests of takeovers.
DEFAULT_LEASE_S = float(os.environ.get("DSMOOTH_LEASE_S", "60"))
EXPIRY_MARGIN = 0.25  # of the lease: a write is refused this close to the lease's end
_HELD: dict[str, RunLease] = {}  # run uri -> the lease this process holds on it


class RunLockedError(Refused):
    """Another job holds this run."""


class LeaseLost(Refused):
    """This job's lease on a run expired and another job took it over (or it could not be
    renewed in time): stop writing. One line, exit 2, like any refusal."""


def _owner(job: str, lease_s: float) -> dict[str, Any]:
    now = time.time()
    return {
        "job": job,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "token": uuid.uuid4().hex,
        "since": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
        "expires_at": now + lease_s,
    }


def _describe(owner: dict[str, Any]) -> str:
    return f"{owner.get('job', 'a dsmooth job')} (pid {owner.get('pid', '?')} on {owner.get('host', '?')}, " \
           f"since {owner.get('since', '?')})"


class RunLease:
    """Held exclusivity on one run; `check()` before every write."""

    def __init__(self, run: Location, job: str, lease_s: float) -> None:
        self.run = run
        self.job = job
        self.lease_s = lease_s
        self.owner = _owner(job, lease_s)
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle: BinaryIO | None = None
        self._etag: str | None = None
        self._valid_until: float | None = None  # expiry in the lease object last written; None: never expires
        self._renewing = threading.RLock()  # one renewal at a time (the heartbeat and check())

    # -- holding -----------------------------------------------------------------------------

    def check(self) -> None:
        """Raise LeaseLost unless this job still holds the run for a while: call before every
        write. Near or past the lease's own expiry (a paused process, failed renewals) it
        renews at once, so a holder that slept through its lease learns it before writing."""
        if self._lost is None and self._near_expiry():
            with self._renewing:
                if self._lost is None and self._near_expiry():
                    self.beat()
                    if self._lost is None and self._near_expiry():
                        self._lost = (f"its lease could not be renewed before it ran out at "
                                      f"{datetime.fromtimestamp(self._valid_until or 0, timezone.utc):%H:%M:%S} UTC")
        if self._lost is not None:
            raise LeaseLost(f"{self.run}: {self._lost}; this job stopped writing to it (finished work is kept; "
                            "the job now holding the run goes on)")

    def _near_expiry(self) -> bool:
        return self._valid_until is not None and time.time() >= self._valid_until - EXPIRY_MARGIN * self.lease_s

    def acquire(self) -> RunLease:
        check_writable(self.run)  # "not writable" before anything else
        if self.run.is_local:
            self._acquire_local()
        else:
            self._acquire_lease()
            self._thread = threading.Thread(target=self._heartbeat, name="dsmooth-lease", daemon=True)
            self._thread.start()
        _HELD[self.run.uri] = self
        return self

    def release(self) -> None:
        if _HELD.get(self.run.uri) is self:
            del _HELD[self.run.uri]
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._handle is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
        elif self._lost is None:
            with contextlib.suppress(Exception):
                self._delete_lease()

    # -- local disk: flock ---------------------------------------------------------------------

    def _acquire_local(self) -> None:
        self.run.mkdir()
        path = self.run.local_path / LOCK_FILE
        handle = open(path, "a+b")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            try:
                holder = json.loads(handle.read() or b"{}")
            except ValueError:
                holder = {}
            handle.close()
            raise RunLockedError(
                f"{self.run} is being written by another job, {_describe(holder)}; wait for it to finish "
                "or stop it (two writers would repeat all the work)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(self.owner).encode())
        handle.flush()
        self._handle = handle

    # -- object storage: a lease ----------------------------------------------------------------

    def _s3(self) -> tuple[Any, str, str]:
        import boto3

        bucket, _, prefix = self.run.path.partition("/")
        key = f"{prefix.rstrip('/')}/{LEASE_FILE}" if prefix else LEASE_FILE
        return boto3.client("s3"), bucket, key

    def _body(self) -> tuple[bytes, float]:
        """The lease object to write now, and the expiry it holds (this job's once written)."""
        expires = time.time() + self.lease_s
        self.owner["expires_at"] = expires
        return json.dumps(self.owner).encode(), expires

    def _acquire_lease(self) -> None:
        if self.run.scheme != "s3":
            self._acquire_unconditional()
            return
        from botocore.exceptions import ClientError

        client, bucket, key = self._s3()
        try:
            body, expires = self._body()
            self._etag = client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")["ETag"]
            self._valid_until = expires
            return
        except ClientError as error:
            if _status(error) not in (409, 412):
                raise
        current = client.get_object(Bucket=bucket, Key=key)
        holder = json.loads(current["Body"].read() or b"{}")
        if float(holder.get("expires_at", 0)) > time.time():
            raise RunLockedError(
                f"{self.run} is being written by another job, {_describe(holder)}; its lease runs until it stops "
                f"(or {max(0, int(holder['expires_at'] - time.time()))} s after it dies)"
            )
        try:  # an expired lease: take it over, unless someone else just did
            body, expires = self._body()
            self._etag = client.put_object(Bucket=bucket, Key=key, Body=body, IfMatch=current["ETag"])["ETag"]
            self._valid_until = expires
            log.warning("%s: took over the expired lease of %s", self.run, _describe(holder))
        except ClientError as error:
            if _status(error) in (409, 412):
                raise RunLockedError(f"{self.run} was just taken by another job") from None
            raise

    def _acquire_unconditional(self) -> None:
        lease = self.run / LEASE_FILE
        if lease.exists():
            holder = json.loads(lease.read_text() or "{}")
            if float(holder.get("expires_at", 0)) > time.time():
                raise RunLockedError(f"{self.run} is being written by another job, {_describe(holder)}")
        body, expires = self._body()
        lease.write_bytes(body)
        if json.loads(lease.read_text()).get("token") != self.owner["token"]:
            raise RunLockedError(f"{self.run} was just taken by another job")
        self._valid_until = expires

    def _renew(self) -> None:
        if self.run.scheme != "s3":
            lease = self.run / LEASE_FILE
            if json.loads(lease.read_text() or "{}").get("token") != self.owner["token"]:
                raise LeaseLost("another job took over this run's lease")
            body, expires = self._body()
            lease.write_bytes(body)
            self._valid_until = expires
            return
        from botocore.exceptions import ClientError

        client, bucket, key = self._s3()
        try:
            body, expires = self._body()
            self._etag = client.put_object(Bucket=bucket, Key=key, Body=body, IfMatch=self._etag)["ETag"]
            self._valid_until = expires
        except ClientError as error:
            if _status(error) in (404, 409, 412):
                raise LeaseLost("another job took over this run's lease") from None
            raise

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_s / 3) and self.beat():
            pass

    def beat(self) -> bool:
        """Renew the lease once; False (and `check()` raising from now on) when it was lost."""
        try:
            with self._renewing:
                self._renew()
        except LeaseLost as error:
            self._lost = str(error)
            log.warning("%s: %s; this job writes nothing more and stops at its next write", self.run, error)
            return False
        except Exception as error:  # noqa: BLE001 - a network blip: retried at the next beat
            log.warning("%s: lease renewal failed (%s); retrying", self.run, error)
        return True

    def _delete_lease(self) -> None:
        if self.run.scheme == "s3":
            client, bucket, key = self._s3()
            client.delete_object(Bucket=bucket, Key=key, IfMatch=self._etag)
        else:
            (self.run / LEASE_FILE).delete()


def check_held(location: str | Location) -> None:
    """LeaseLost when `location` lies in a run this process holds and its lease is lost or
    about to run out (see RunLease.check); nothing for runs it does not hold."""
    uri = Location.of(location).uri
    for run, lease in list(_HELD.items()):
        if uri == run or uri.startswith(run.rstrip("/") + "/"):
            lease.check()


def _status(error: Any) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


@contextlib.contextmanager
def exclusive_run(run: str | Location, job: str, lease_s: float = DEFAULT_LEASE_S) -> Iterator[RunLease]:
    """Hold `run` for this job; RunLockedError (one line, exit 2) when another job holds it."""
    lease = RunLease(Location.of(run), job, lease_s).acquire()
    try:
        yield lease
    finally:
        lease.release()
