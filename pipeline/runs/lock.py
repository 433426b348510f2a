"""One writer per run: a second job on the same run directory is refused at once.

Two jobs writing one run would both do all the work and leave duplicate rows (and, for an
API, pay every query twice). How exclusivity is held depends on the storage:

- local disk: an `fcntl.flock` on `RUN/.lock`, released by the kernel when the holder exits
  or dies, so it is never stale;
- S3: a *lease* object `RUN/.lock.json` created with a conditional write (`If-None-Match: *`,
  which S3 and compatible servers evaluate atomically) and renewed by a heartbeat with
  `If-Match: <etag>` (compare-and-swap). A lease not renewed for `lease_s` (its holder died)
  may be taken over, again by compare-and-swap. A holder whose renewal fails has lost the run
  and stops writing (`check()` raises);
- other object stores (gs://): the same lease, but written without a condition (pyarrow
  exposes none) and read back to confirm: best effort, two jobs starting in the same
  instant could both proceed. Said so in the README.

Lease expiry uses the holder's clock, so clocks must agree within the lease length.
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
from pipeline.runs.fs import Location

log = logging.getLogger("dsmooth")

LOCK_FILE = ".lock"
LEASE_FILE = ".lock.json"
DEFAULT_LEASE_S = 60.0


class RunLockedError(Refused):
    """Another job holds this run."""


class LeaseLost(RuntimeError):
    """This job's lease on a run expired and another job took it over: stop writing."""


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

    # -- holding -----------------------------------------------------------------------------

    def check(self) -> None:
        if self._lost is not None:
            raise LeaseLost(f"{self.run}: {self._lost}; this job stopped writing to it")

    def acquire(self) -> RunLease:
        from pipeline.runs.storage import check_writable

        check_writable(self.run)  # "not writable" before anything else
        if self.run.is_local:
            self._acquire_local()
        else:
            self._acquire_lease()
            self._thread = threading.Thread(target=self._heartbeat, name="dsmooth-lease", daemon=True)
            self._thread.start()
        return self

    def release(self) -> None:
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

    def _body(self) -> bytes:
        self.owner["expires_at"] = time.time() + self.lease_s
        return json.dumps(self.owner).encode()

    def _acquire_lease(self) -> None:
        if self.run.scheme != "s3":
            self._acquire_unconditional()
            return
        from botocore.exceptions import ClientError

        client, bucket, key = self._s3()
        try:
            self._etag = client.put_object(Bucket=bucket, Key=key, Body=self._body(), IfNoneMatch="*")["ETag"]
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
            self._etag = client.put_object(Bucket=bucket, Key=key, Body=self._body(), IfMatch=current["ETag"])["ETag"]
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
        lease.write_text(json.dumps({**self.owner, "expires_at": time.time() + self.lease_s}))
        if json.loads(lease.read_text()).get("token") != self.owner["token"]:
            raise RunLockedError(f"{self.run} was just taken by another job")

    def _renew(self) -> None:
        if self.run.scheme != "s3":
            lease = self.run / LEASE_FILE
            if json.loads(lease.read_text() or "{}").get("token") != self.owner["token"]:
                raise LeaseLost("another job took over this run's lease")
            lease.write_text(json.dumps({**self.owner, "expires_at": time.time() + self.lease_s}))
            return
        from botocore.exceptions import ClientError

        client, bucket, key = self._s3()
        try:
            self._etag = client.put_object(Bucket=bucket, Key=key, Body=self._body(), IfMatch=self._etag)["ETag"]
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
            self._renew()
        except LeaseLost as error:
            self._lost = str(error)
            log.error("%s: %s; stopping writes", self.run, error)
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
