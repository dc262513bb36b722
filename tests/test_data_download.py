"""Tests of anomalib_study.data.download against a local http.server on 127.0.0.1 (no other traffic)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from anomalib_study.data import download
from anomalib_study.errors import DataError


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_GET(self):
        server = self.server
        server.requests.append(self.headers.get("Range"))
        data = server.payload
        start = 0
        header = self.headers.get("Range")
        if header and server.honour_range:
            start = int(header.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cuts_left > 0:  # announce the whole body, send half, drop the connection
            server.cuts_left -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.requests, httpd.payload, httpd.honour_range, httpd.cuts_left = [], b"", True, 0
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# incompressible content so the archive is large enough to be cut in the middle
FILES = {"bottle/train/good/000.png": bytes(range(256)) * 400, "license.txt": b"CC BY-NC-SA 4.0\n"}


def _url(httpd, name="mvtec_anomaly_detection.tar.xz"):
    return f"http://127.0.0.1:{httpd.server_address[1]}/{name}"


def test_download_verify_extract(server, tmp_path):
    server.payload = _tar_xz(FILES)
    digest = hashlib.sha256(server.payload).hexdigest()
    out = download("mvtec_ad", tmp_path, url=_url(server), sha256=digest, progress=False)
    assert out == tmp_path / "mvtec_ad"
    assert (out / "bottle" / "train" / "good" / "000.png").read_bytes() == FILES["bottle/train/good/000.png"]
    assert not list((tmp_path / ".downloads").iterdir())  # archive removed after extraction
    # a second call reuses the extracted folder without any request
    count = len(server.requests)
    assert download("mvtec_ad", tmp_path, url=_url(server), sha256=digest, progress=False) == out
    assert len(server.requests) == count


def test_resume_after_connection_cut(server, tmp_path):
    server.payload = _tar_xz(FILES)
    server.cuts_left = 1
    digest = hashlib.sha256(server.payload).hexdigest()
    out = download("mvtec_ad", tmp_path, url=_url(server), sha256=digest, progress=False)
    assert server.requests[0] is None
    assert server.requests[1] == f"bytes={len(server.payload) // 2}-"  # resumed, not restarted
    assert (out / "license.txt").read_bytes() == FILES["license.txt"]


def test_server_ignoring_range_restarts(server, tmp_path):
    server.payload = _tar_xz(FILES)
    server.cuts_left, server.honour_range = 1, False
    digest = hashlib.sha256(server.payload).hexdigest()
    out = download("mvtec_ad", tmp_path, url=_url(server), sha256=digest, progress=False)
    assert server.requests[1] is not None  # it asked to resume; the server sent everything again
    assert (out / "bottle" / "train" / "good" / "000.png").is_file()


def test_checksum_mismatch_deletes_part(server, tmp_path):
    server.payload = _tar_xz(FILES)
    wrong = "0" * 64
    with pytest.raises(DataError, match=f"expected sha256 {wrong}, got {hashlib.sha256(server.payload).hexdigest()}"):
        download("mvtec_ad", tmp_path, url=_url(server), sha256=wrong, progress=False)
    assert not list((tmp_path / ".downloads").glob("*"))
    assert not (tmp_path / "mvtec_ad").exists()


def test_no_checksum_warns(server, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("Class1/Train/0001.PNG", b"png")
    server.payload = buffer.getvalue()
    with pytest.warns(UserWarning, match="verification skipped"):
        out = download("dagm2007", tmp_path, url=_url(server, "Class1.zip"), progress=False)
    assert (out / "Class1" / "Train" / "0001.PNG").read_bytes() == b"png"


def test_unsafe_archive_is_refused(server, tmp_path):
    server.payload = _tar_xz({"../evil.txt": b"x"})
    with pytest.warns(UserWarning):
        with pytest.raises(DataError, match="unsafe path"):
            download("mvtec_ad", tmp_path / "d", url=_url(server, "evil.tar.xz"), progress=False)
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "d" / "mvtec_ad").exists()


def test_unknown_name_and_foreign_target(tmp_path):
    with pytest.raises(Exception, match="unknown data set"):
        download("imagenet", tmp_path)
    (tmp_path / "mvtec_ad").mkdir()
    with pytest.raises(DataError, match="not made by download"):
        download("mvtec_ad", tmp_path, progress=False)
