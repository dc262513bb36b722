"""Verified, resumable downloads of the public data sets into their official layout.

``download(name, dest)`` fetches every archive of ``name`` into ``dest/.downloads``
(resuming a ``.part`` file with an HTTP Range request; a server that ignores Range makes
it start over), checks its sha256, extracts it safely (no member may land outside the
target) into a temporary folder and renames that folder to ``dest/<name>`` in one step.
Nothing here runs unless a user asks for it: no test or notebook downloads real data.
"""

from __future__ import annotations

import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from anomalib_study.errors import DataError, ParameterError
from anomalib_study.io import sha256_file, write_json

_CHUNK = 1 << 16
_ATTEMPTS = 3  # connection cuts tolerated per file; each attempt resumes from the .part file
_TIMEOUT = 60
_STAMP = ".download.json"


@dataclass(frozen=True)
class RemoteFile:
    """One archive of a data set: file name, official URL, sha256 (None: not published)."""

    filename: str
    url: str
    sha256: str | None


#: name -> the archives that together make the official layout under dest/<name>
DOWNLOADS: dict[str, tuple[RemoteFile, ...]] = {
    # URL and sha256 as used by anomalib's MVTecAD data module (DOWNLOAD_INFO "mvtecad")
    "mvtec_ad": (
        RemoteFile(
            "mvtec_anomaly_detection.tar.xz",
            "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/"
            "420938113-1629952094/mvtec_anomaly_detection.tar.xz",
            "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
        ),
    ),
    # Zenodo record 8086136 (Class1.zip .. Class10.zip); no checksum could be confirmed, so
    # verification is skipped with a warning rather than trusting an invented value.
    "dagm2007": tuple(
        RemoteFile(f"Class{i}.zip", f"https://zenodo.org/records/8086136/files/Class{i}.zip?download=1", None)
        for i in range(1, 11)
    ),
}


def _fetch(remote: RemoteFile, part: Path, progress: bool) -> None:
    """Append the rest of ``remote`` to ``part``; raises on a cut connection (caller retries)."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(remote.url, headers={"User-Agent": "anomalib-study"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to send: the .part is complete
            return
        raise DataError(f"download of {remote.url} failed: HTTP {exc.code} {exc.reason}") from None
    with response:
        status = response.status
        if status == 206:
            mode = "ab"
        elif status == 200:
            mode, offset = "wb", 0  # the server ignored Range: start again from byte 0
        else:
            raise DataError(f"download of {remote.url} failed: unexpected HTTP status {status}")
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with (
            open(part, mode) as handle,
            tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=remote.filename, disable=not progress
            ) as bar,
        ):
            while True:
                block = response.read(_CHUNK)
                if not block:
                    break
                handle.write(block)
                bar.update(len(block))
        if total is not None and part.stat().st_size < total:
            raise http.client.IncompleteRead(b"", total - part.stat().st_size)


def _download_file(remote: RemoteFile, folder: Path, progress: bool) -> Path:
    """Download (or resume) one archive into ``folder``; verify it; return its path."""
    target = folder / remote.filename
    part = folder / (remote.filename + ".part")
    if target.is_file() and (remote.sha256 is None or sha256_file(target) == remote.sha256):
        return target
    folder.mkdir(parents=True, exist_ok=True)
    last_error: Exception | None = None
    for _attempt in range(_ATTEMPTS):
        try:
            _fetch(remote, part, progress)
            last_error = None
            break
        except (http.client.IncompleteRead, http.client.HTTPException, urllib.error.URLError, OSError) as exc:
            last_error = exc
    if last_error is not None:
        size = part.stat().st_size if part.exists() else 0
        raise DataError(
            f"download of {remote.url} was cut after {_ATTEMPTS} attempts ({last_error or type(last_error).__name__}); "
            f"{size} bytes are kept in {part}: run the download again to resume"
        )
    if remote.sha256 is None:
        warnings.warn(f"no published sha256 for {remote.filename}: checksum verification skipped", stacklevel=3)
    else:
        actual = sha256_file(part)
        if actual != remote.sha256.lower():
            part.unlink(missing_ok=True)
            raise DataError(
                f"checksum mismatch for {remote.filename} from {remote.url}: expected sha256 {remote.sha256}, "
                f"got {actual}; the partial file was deleted, download again"
            )
    os.replace(part, target)
    return target


def _safe_member(name: str, archive: Path) -> None:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        raise DataError(f"archive {archive} holds an unsafe path {name!r} (outside the target folder): not extracted")


def _extract(archive: Path, into: Path) -> None:
    """Extract a tar (any compression) or zip archive; refuses members that would escape ``into``."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as handle:
                for name in handle.namelist():
                    _safe_member(name, archive)
                handle.extractall(into)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as handle:
                members = handle.getmembers()
                for member in members:
                    _safe_member(member.name, archive)
                    if member.issym() or member.islnk():
                        link = PurePosixPath(member.name).parent / member.linkname
                        if (
                            PurePosixPath(member.linkname).is_absolute()
                            or ".." in PurePosixPath(os.path.normpath(str(link))).parts
                        ):
                            raise DataError(
                                f"archive {archive} holds a link {member.name!r} pointing outside: not extracted"
                            )
                    elif not (member.isfile() or member.isdir()):
                        raise DataError(f"archive {archive} holds a special file {member.name!r}: not extracted")
                if hasattr(tarfile, "data_filter"):
                    handle.extractall(into, members=members, filter="data")
                else:  # pragma: no cover - Python without extraction filters
                    handle.extractall(into, members=members)
        else:
            raise DataError(f"{archive} is neither a tar nor a zip archive: cannot extract it")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise DataError(f"archive {archive} cannot be extracted ({exc}): delete it and download again") from None


def download(
    name: str,
    dest: str | os.PathLike,
    *,
    url: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
) -> Path:
    """Download, verify and extract the data set ``name`` into ``dest/<name>``; return that folder.

    Args:
        name: ``"mvtec_ad"`` or ``"dagm2007"`` (see :data:`DOWNLOADS`); any other name
            needs ``url``.
        dest: the data folder; archives are kept in ``dest/.downloads`` until extracted.
        url: download this single archive instead of the table's files (a mirror).
        sha256: the expected sha256 of that archive (overrides the table's); without one,
            verification is skipped with a warning.
        progress: show a tqdm progress bar per file.

    An existing ``dest/<name>`` made by an earlier download is returned as it is.

    Raises:
        DataError: network failure after retries (the ``.part`` file is kept for resuming),
            checksum mismatch (the ``.part`` file is deleted), unsafe or broken archive, or
            ``dest/<name>`` exists but was not made by this function.
        ParameterError: unknown name without ``url``.
    """
    if url is not None:
        filename = PurePosixPath(url.split("?", 1)[0]).name or f"{name}.archive"
        table = DOWNLOADS.get(name, ())
        known = next((f.sha256 for f in table if f.url == url), None)
        files: tuple[RemoteFile, ...] = (RemoteFile(filename, url, sha256 or known),)
    elif name in DOWNLOADS:
        files = DOWNLOADS[name]
        if sha256 is not None:
            if len(files) != 1:
                raise ParameterError(f"{name} has {len(files)} archives: sha256= applies only with a single url=")
            files = (RemoteFile(files[0].filename, files[0].url, sha256),)
    else:
        raise ParameterError(f"unknown data set {name!r}: choose from {', '.join(sorted(DOWNLOADS))} or pass url=")
    dest = Path(dest).expanduser()
    target = dest / name
    if target.exists():
        if (target / _STAMP).is_file():
            return target
        raise DataError(f"{target} exists but was not made by download(): remove or rename it to download again")
    dest.mkdir(parents=True, exist_ok=True)
    archives = [_download_file(remote, dest / ".downloads", progress) for remote in files]
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.extract-", dir=dest))
    try:
        for archive in archives:
            _extract(archive, staging)
        write_json(
            staging / _STAMP,
            {
                "name": name,
                "files": [{"filename": f.filename, "url": f.url, "sha256": f.sha256} for f in files],
            },
        )
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for archive in archives:
        archive.unlink(missing_ok=True)
    return target
