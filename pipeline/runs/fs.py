"""Where runs, data and checkpoints live: a local folder or object storage, one interface.

`Location` wraps a `pyarrow.fs` file system and a path in it, so the same code writes a run
to `/data/runs/x`, `s3://bucket/runs/x` or `gs://bucket/runs/x`. Object stores have no
rename, but a single PUT is atomic (an object exists whole or not at all), so every write
here is atomic either way: local files go through a temporary file, fsync and rename;
objects are sent in one request. The standard `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`
variables (and the other `AWS_*` ones) point S3 access at any compatible server.

Local files are written by `atomic_open` (below) (temporary file, fsync, rename,
permissions from the umask).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipeline.config import location_problem
import tempfile
from contextlib import contextmanager
from typing import IO



class StorageError(ValueError):
    """A location that cannot be used (unknown scheme, unreachable bucket...)."""


def is_uri(text: str | os.PathLike) -> bool:
    return "://" in str(text)


def s3_endpoint() -> str | None:
    """The S3 endpoint the standard variables name (AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL),
    as boto3 reads them; None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _object_store(scheme: str) -> pafs.FileSystem:
    if scheme == "s3":
        options: dict[str, Any] = {}
        endpoint = s3_endpoint()
        if endpoint:
            parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            options = {"endpoint_override": parsed.netloc, "scheme": parsed.scheme}
        # One PUT for small objects (parts, run records) instead of a multipart upload: atomic,
        # fewer requests, and what S3-compatible servers support best.
        return pafs.S3FileSystem(allow_delayed_open=True, **options)
    return pafs.GcsFileSystem()


@dataclass(frozen=True)
class Location:
    """A file or folder: `uri` as users see it, `path` inside the file system `fs`."""

    uri: str
    path: str
    fs: pafs.FileSystem = field(compare=False, repr=False)

    @classmethod
    def of(cls, where: str | os.PathLike | Location) -> Location:
        """A local path, `s3://bucket/key` or `gs://bucket/key`; anything else is refused."""
        if isinstance(where, Location):
            return where
        text = os.fspath(where)
        if not is_uri(text) or text.startswith("file://"):
            local = Path(text.removeprefix("file://")).expanduser().absolute()
            return cls(str(local), str(local), pafs.LocalFileSystem())
        problem = location_problem(text)
        if problem:
            raise StorageError(problem)
        scheme, rest = text.split("://", 1)
        scheme, rest = scheme.lower(), rest.strip("/")
        try:
            fs = _object_store(scheme)
        except Exception as error:  # noqa: BLE001 - e.g. no GCS support in this pyarrow build
            raise StorageError(f"{text}: {scheme}:// storage is not available here ({error})") from None
        return cls(f"{'gs' if scheme == 'gcs' else scheme}://{rest}", rest, fs)

    # -- naming ---------------------------------------------------------------------------

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0] if is_uri(self.uri) else "file"

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        uri, path = self.uri.rstrip("/").rsplit("/", 1)[0], self.path.rstrip("/").rsplit("/", 1)[0]
        return Location(uri, path, self.fs)

    def __truediv__(self, name: str) -> Location:
        return Location(f"{self.uri.rstrip('/')}/{name}", f"{self.path.rstrip('/')}/{name}", self.fs)

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        if not self.is_local:
            raise TypeError(f"{self.uri} is not a local path")
        return self.path

    @property
    def local_path(self) -> Path:
        if not self.is_local:
            raise StorageError(f"{self.uri} is not a local path")
        return Path(self.path)

    # -- queries ---------------------------------------------------------------------------

    def _info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path)
        except OSError as error:
            raise StorageError(f"{self.uri}: {error}") from None

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def size(self) -> int:
        return int(self._info().size or 0)

    def files(self, recursive: bool = False) -> list[Location]:
        """Files in this folder (sorted by path); none when it does not exist."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True))
        except OSError as error:
            raise StorageError(f"{self.uri}: {error}") from None
        found = []
        for info in infos:
            if info.type == pafs.FileType.File:
                relative = info.path[len(self.path.rstrip("/")) + 1 :]
                found.append(self / relative)
        return sorted(found, key=lambda location: location.path)

    def walk(self) -> Iterator[tuple[Location, list[str], list[str]]]:
        """os.walk for any file system: (folder, sub-folder names, file names), top down."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        except OSError as error:
            raise StorageError(f"{self.uri}: {error}") from None
        children: dict[str, tuple[list[str], list[str]]] = {self.path.rstrip("/"): ([], [])}
        for info in sorted(infos, key=lambda i: i.path):
            parent, _, name = info.path.rstrip("/").rpartition("/")
            children.setdefault(parent, ([], []))
            if info.type == pafs.FileType.Directory:
                children[parent][0].append(name)
                children.setdefault(info.path.rstrip("/"), ([], []))
            elif info.type == pafs.FileType.File:
                children[parent][1].append(name)
        # Object stores list implicit folders only through their files: add them.
        for path in list(children):
            parent, _, name = path.rpartition("/")
            if parent in children and path != self.path.rstrip("/") and name not in children[parent][0]:
                children[parent][0].append(name)
        pending = [self.path.rstrip("/")]
        while pending:
            path = pending.pop(0)
            dirs, files = children.get(path, ([], []))
            dirs = sorted(set(dirs))
            yield Location(self.uri + path[len(self.path.rstrip("/")):], path, self.fs), dirs, sorted(files)
            pending[:0] = [f"{path}/{d}" for d in dirs if f"{path}/{d}" in children]

    # -- reading ---------------------------------------------------------------------------

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as stream:
                return stream.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri} does not exist") from None
        except OSError as error:
            if not self.exists():
                raise FileNotFoundError(f"{self.uri} does not exist") from None
            raise StorageError(f"cannot read {self.uri}: {error}") from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def sha256(self) -> str:
        return hashlib.sha256(self.read_bytes()).hexdigest()

    # -- writing ---------------------------------------------------------------------------

    def mkdir(self) -> None:
        try:
            self.fs.create_dir(self.path, recursive=True)
        except OSError as error:
            raise PermissionError(f"cannot create {self.uri}: {error}") from None

    def write_bytes(self, data: bytes) -> None:
        """Atomically: readers see the old content or all of the new one, never a part."""
        if self.is_local:
            _write_local_atomic(Path(self.path), data)
            return
        try:
            with self.fs.open_output_stream(self.path) as stream:
                stream.write(data)
        except OSError as error:
            raise StorageError(f"cannot write {self.uri}: {error}") from None

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def delete(self, missing_ok: bool = True) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError as error:
            if self.exists() or not missing_ok:
                raise StorageError(f"cannot delete {self.uri}: {error}") from None

    # -- local copies -----------------------------------------------------------------------

    def local_copy(self, cache: Path | None = None) -> Path:
        """A local path holding this file or folder: itself when local, else a cached download
        (kept while the remote size of every file is unchanged)."""
        if self.is_local:
            return Path(self.path)
        cache = Path(cache or os.environ.get("DSMOOTH_CACHE", Path.home() / ".cache" / "dsmooth")) / "remote"
        target = cache / hashlib.sha256(self.uri.encode()).hexdigest()[:16] / self.name
        if self.is_file():
            _download(self, target)
            return target
        files = self.files(recursive=True)
        if not files:
            raise FileNotFoundError(f"{self.uri} does not exist or is empty")
        for file in files:
            _download(file, target / file.path[len(self.path.rstrip('/')) + 1 :])
        return target


def _download(source: Location, target: Path) -> None:
    if target.is_file() and target.stat().st_size == source.size():
        return
    _write_local_atomic(target, source.read_bytes())


def _write_local_atomic(path: Path, data: bytes) -> None:
    try:
        with atomic_open(path, "wb") as handle:
            handle.write(data)
    except (PermissionError, NotADirectoryError, FileExistsError) as error:
        raise PermissionError(f"cannot write {path}: {error.strerror or error}") from None


def check_writable(run: Location) -> None:
    """Fail before any work when results could not be saved."""
    import uuid

    probe = run / f".write-test-{uuid.uuid4().hex}"
    try:
        run.mkdir()
        probe.write_bytes(b"")
        probe.delete()
    except (OSError, StorageError, PermissionError) as error:
        raise PermissionError(f"output directory {run} is not writable: {error}") from None


# ------------------------------------------------------------------------------------------
# Atomic file writes: a reader sees the old file or the complete new one, never half of one.
#
# Votes, checkpoints and run records are all written this way, because a job may be killed at
# any moment and resume must never read a torn file. Files get the permissions the umask allows
# (`tempfile.mkstemp` alone would leave them private, 0600), so a run on shared storage stays
# readable by its group.

def current_umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it,
    which races with other threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def file_mode() -> int:
    """Permissions of a new file, as open() would give it: 0o666 less the umask."""
    return 0o666 & ~current_umask()


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary file beside `path`; on success fsync and rename it onto `path`,
    on any error remove it (the old `path`, if any, stays untouched)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, file_mode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
