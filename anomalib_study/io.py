"""Small file helpers shared by the modules that touch the disk (data layer, runner, save/load)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from anomalib_study.errors import DiskFullError, StudyError

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def package_sources_hash() -> str:
    """sha256 over the package's ``*.py`` files (relative path and bytes, in sorted order):
    what a report's code was, recorded by the runner and compared by the index."""
    package = Path(__file__).resolve().parent
    digest = []
    for path in sorted(package.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.append(f"{path.relative_to(package).as_posix()}:{sha256_file(path)}")
    return sha256_bytes("\n".join(digest).encode())


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one step.

    A crash or an exception while writing leaves any earlier ``path`` untouched and no
    half-written file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        if error.errno in _NO_SPACE:
            raise disk_full(path, error) from None
        raise
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.errno in _NO_SPACE and not isinstance(error, DiskFullError):
            raise disk_full(path, error) from None
        raise


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def disk_full(path: str | os.PathLike, error: OSError) -> DiskFullError:
    """The error for a write of ``path`` that failed for lack of space: one sentence naming
    the file, its folder and the space left there (the earlier file, if any, is kept)."""
    folder = Path(path).parent
    try:
        left = f"{shutil.disk_usage(folder).free / 1e6:.1f} MB left"
    except OSError:
        left = "space left unknown"
    what = "quota exceeded" if error.errno == errno.EDQUOT else "no space left on the device"
    return DiskFullError(
        f"could not write {path}: {what} ({left} in {folder}); nothing was half-written and any earlier "
        f"{Path(path).name} is kept: free some space there or write to another folder"
    )


def check_output_folder(folder: str | os.PathLike, what: str = "--out") -> Path:
    """``folder`` as a Path, checked before any work (nothing is created): StudyError when it
    names an existing file (or lies under one), or when the folder it would be made in is
    not writable."""
    folder = Path(folder)
    for part in (folder, *folder.parents):
        if part.exists():
            if not part.is_dir():
                raise StudyError(f"{what} {folder}: {part} is a file, not a folder: pass a folder for the results")
            if not os.access(part, os.W_OK | os.X_OK):
                raise StudyError(f"{what} {folder}: {part} is not writable: choose another folder")
            break
    return folder


@contextlib.contextmanager
def folder_lock(lock_path: str | os.PathLike, what: str, wait: bool = True, notify: Any = None) -> Iterator[None]:
    """Hold the lock file ``lock_path`` (``filelock``: released when the process ends, however it
    ends) while the block runs, so that two processes never write ``what`` at once.

    When another process holds it: ``wait=True`` says so once, naming the holder (process id,
    host, command, since when), and waits for it; ``wait=False`` raises StudyError naming it.
    ``notify(message)`` says it (default: a warning; a caller that records its warnings
    passes a function that prints at once).
    """
    import socket
    import sys
    import warnings

    from filelock import FileLock, Timeout

    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    owner = lock_path.with_name(lock_path.name + ".owner")
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            holder = owner.read_text(encoding="utf-8").strip() or "another process"
        except OSError:
            holder = "another process"
        if not wait:
            raise StudyError(f"{what} is in use by {holder}: wait for it to finish, or use another folder") from None
        message = f"{what} is in use by {holder}: waiting for it to finish"
        if notify is None:
            warnings.warn(message, stacklevel=3)
        else:
            notify(message)
        lock.acquire()
    try:
        started = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        command = " ".join(sys.argv[:3]) or "python"
        with contextlib.suppress(OSError):
            owner.write_text(f"process {os.getpid()} on {socket.gethostname()} ({command}, since {started})")
        yield
    finally:
        with contextlib.suppress(OSError):
            owner.unlink()
        lock.release()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_write(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False, default=_json_default)
        handle.write("\n")
    return Path(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def as_json(value: Any) -> Any:
    """``value`` as it reads back from a JSON file (tuples -> lists, numpy -> Python, paths
    and other objects -> strings): for comparing settings with stored ones."""
    return json.loads(json.dumps(value, default=_json_default_or_str))


def _json_default_or_str(value: Any) -> Any:
    try:
        return _json_default(value)
    except TypeError:
        return str(value)


def new_run_dir(parent: str | os.PathLike) -> Path:
    """Create and return a new, empty ``parent/<timestamp>/`` folder; never reuses one.

    The name is the local time to the microsecond; if that folder exists already (two
    runs in the same microsecond), a numeric suffix is added.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    for attempt in range(1000):
        candidate = parent / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run folder under {parent}")


@contextlib.contextmanager
def run_dir_in_progress(parent: str | os.PathLike) -> Iterator[Path]:
    """Write a run into a hidden folder that becomes ``parent/<timestamp>/`` only when done.

    Yields a :class:`RunFolder` whose ``path`` is the work folder
    ``parent/.<timestamp>.<random>.partial/``. When the block ends without error the work
    folder is renamed, in one step, to the first free ``parent/<timestamp>[-N]/`` (as
    :func:`new_run_dir` names them), which is then ``final``::

        with run_dir_in_progress("result") as run:
            ...write into run.path...
        run_dir = run.final

    An exception (Ctrl-C included) removes the work folder; a killed process leaves only
    the hidden ``.partial`` folder, so a run folder without that suffix is always complete.
    """
    import shutil

    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    work = Path(tempfile.mkdtemp(prefix=f".{stamp}.", suffix=".partial", dir=parent))
    os.chmod(work, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; a run folder gets the usual permissions
    holder = RunFolder(work)
    try:
        yield holder
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    for attempt in range(1000):
        candidate = parent / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            candidate.mkdir()  # claim the name; then replace the empty folder by the finished run
        except FileExistsError:
            continue
        os.replace(work, candidate)
        holder.final = candidate
        return
    raise RuntimeError(f"could not name the run folder under {parent} (the finished run is in {work})")


@dataclass
class RunFolder:
    """A run being written by :func:`run_dir_in_progress`: ``path`` (the hidden work
    folder), ``final`` (the finished run's folder, set when the block ends without error)."""

    path: Path
    final: Path | None = None


def data_root(explicit: str | os.PathLike | None = None) -> Path | None:
    """The real-data folder: ``explicit``, else $ANOMALIB_STUDY_DATA, else None."""
    value = explicit or os.environ.get("ANOMALIB_STUDY_DATA")
    return Path(value).expanduser() if value else None


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    """The feature-cache folder: ``explicit``, else $ANOMALIB_STUDY_CACHE, else ~/.cache/anomalib_study."""
    value = explicit or os.environ.get("ANOMALIB_STUDY_CACHE")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "anomalib_study"


#: the seed of the one synthetic set the study shares (made by `data.synthetic.shared_synthetic_set`)
SHARED_SYNTHETIC_SEED = 0


def shared_synthetic_path() -> Path:
    """Where the study's shared synthetic set lives: ``<cache>/synthetic_dagm`` (not generated)."""
    return cache_root() / "synthetic_dagm"


def read_json_object(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when the file is missing, unreadable, not JSON or
    not an object (for files another run may be writing or may have left half-written)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
