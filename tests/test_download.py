"""The downloader against a real HTTP server on 127.0.0.1 (Range support, dropped connections)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from medcap_helpers.download import (
    OPENI_IMAGES,
    OPENI_REPORTS,
    DownloadError,
    download_file,
    download_openi,
    extract_archive,
    main,
    sha256_file,
)


@dataclass
class Server:
    """What the test server serves and what it saw."""

    files: dict[str, bytes] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)
    """path -> bytes to send before dropping the connection (once, on the next request)."""
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    """(path, Range header) of every GET."""
    base_url: str = ""


@pytest.fixture()
def server() -> Iterator[Server]:
    state = Server()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            state.requests.append((self.path, self.headers.get("Range")))
            data = state.files.get(self.path)
            if data is None:
                self.send_error(404, "Not Found")
                return
            start = 0
            header = self.headers.get("Range")
            if header and not state.ignore_range:
                start = int(header.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            cut = state.cut_after.pop(self.path, None)
            if cut is not None:
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _payload(size: int = 300_000) -> bytes:
    return np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8).tobytes()


def _tgz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_plain_download_checks_sha256_and_leaves_no_part_file(server: Server, tmp_path: Path) -> None:
    data = _payload()
    server.files["/file.bin"] = data
    dest = download_file(f"{server.base_url}/file.bin", tmp_path / "file.bin",
                         expected_sha256=hashlib.sha256(data).hexdigest(), chunk_size=8192, progress=False)
    assert dest.read_bytes() == data
    assert not (tmp_path / "file.bin.part").exists()
    assert server.requests == [("/file.bin", None)]
    download_file(f"{server.base_url}/file.bin", dest, expected_sha256=hashlib.sha256(data).hexdigest(),
                  progress=False)
    assert len(server.requests) == 1  # a verified file is not fetched again


def test_interrupted_download_is_resumed_with_a_range_request(server: Server, tmp_path: Path) -> None:
    data = _tgz({"images/CXR1_1_IM-0001-3001.png": _payload(200_000), "images/notes.txt": b"hello"})
    server.files["/NLMCXR_png.tgz"] = data
    server.cut_after["/NLMCXR_png.tgz"] = 50_000
    url = f"{server.base_url}/NLMCXR_png.tgz"
    dest = tmp_path / "NLMCXR_png.tgz"
    with pytest.raises(DownloadError, match=r"interrupted after 50,000 bytes.*run the same command again") as info:
        download_file(url, dest, retries=0, chunk_size=4096, progress=False)
    assert url in str(info.value)
    part = tmp_path / "NLMCXR_png.tgz.part"
    assert part.stat().st_size == 50_000 and not dest.exists()

    download_file(url, dest, expected_sha256=hashlib.sha256(data).hexdigest(), chunk_size=4096, progress=False)
    assert server.requests[-1] == ("/NLMCXR_png.tgz", "bytes=50000-")
    assert sha256_file(dest) == hashlib.sha256(data).hexdigest()
    assert not part.exists()


def test_a_dropped_connection_is_resumed_within_one_call(server: Server, tmp_path: Path) -> None:
    data = _payload()
    server.files["/f"] = data
    server.cut_after["/f"] = 123_456
    dest = download_file(f"{server.base_url}/f", tmp_path / "f", retries=1, progress=False)
    assert dest.read_bytes() == data
    assert [r for _, r in server.requests] == [None, "bytes=123456-"]


def test_server_that_ignores_range_makes_a_fresh_start(server: Server, tmp_path: Path) -> None:
    data = _payload()
    server.files["/f"] = data
    server.ignore_range = True
    (tmp_path / "f.part").write_bytes(data[:1000])
    dest = download_file(f"{server.base_url}/f", tmp_path / "f", expected_size=len(data), progress=False)
    assert server.requests == [("/f", "bytes=1000-")]
    assert dest.read_bytes() == data  # not the 1,000 stale bytes + the whole file


def test_a_complete_part_file_is_finished_without_downloading(server: Server, tmp_path: Path) -> None:
    data = _payload(10_000)
    server.files["/f"] = data
    (tmp_path / "f.part").write_bytes(data)
    dest = download_file(f"{server.base_url}/f", tmp_path / "f", expected_sha256=hashlib.sha256(data).hexdigest(),
                         progress=False)
    assert dest.read_bytes() == data and server.requests == [("/f", "bytes=10000-")]


def test_checksum_mismatch_is_a_clear_error(server: Server, tmp_path: Path) -> None:
    server.files["/f"] = _payload(5_000)
    url = f"{server.base_url}/f"
    with pytest.raises(DownloadError, match=r"Checksum mismatch for http://127\.0\.0\.1:\d+/f: expected SHA-256 0{64}"):
        download_file(url, tmp_path / "f", expected_sha256="0" * 64, progress=False)
    assert not (tmp_path / "f").exists() and not (tmp_path / "f.part").exists()
    with pytest.raises(ValueError, match="not a SHA-256"):
        download_file(url, tmp_path / "f", expected_sha256="abc", progress=False)
    with pytest.raises(DownloadError, match="expected 4,999 bytes, got 5,000"):
        download_file(url, tmp_path / "f", expected_size=4_999, progress=False)


def test_http_and_connection_errors_name_the_url(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"/missing.tgz: HTTP 404"):
        download_file(f"{server.base_url}/missing.tgz", tmp_path / "m.tgz", progress=False)
    with pytest.raises(DownloadError, match=r"Cannot reach http://127\.0\.0\.1:9/x"):
        download_file("http://127.0.0.1:9/x", tmp_path / "x", timeout=5, progress=False)


def test_download_openi_fetches_and_extracts_safely(server: Server, tmp_path: Path) -> None:
    png = _payload(1_000)
    server.files["/collections/" + OPENI_IMAGES] = _tgz({"CXR1_1_IM-0001-3001.png": png,
                                                         "sub/CXR2_IM-0652-1001.png": png})
    server.files["/collections/" + OPENI_REPORTS] = _tgz({"ecgen-radiology/1.xml": b"<eCitation/>"})
    paths = download_openi(tmp_path / "data", base_url=f"{server.base_url}/collections", progress=False)
    assert paths["reports"] == tmp_path / "data" / OPENI_REPORTS and paths["reports"].is_file()
    assert paths["images"] == tmp_path / "data" / "NLMCXR_png"
    assert (paths["images"] / "CXR1_1_IM-0001-3001.png").read_bytes() == png
    assert (paths["images"] / "sub" / "CXR2_IM-0652-1001.png").is_file()
    requests_before = len(server.requests)
    (paths["images"] / "CXR1_1_IM-0001-3001.png").unlink()
    download_openi(tmp_path / "data", base_url=f"{server.base_url}/collections", progress=False)
    assert len(server.requests) == requests_before  # archives present (no checksum known: kept as they are)
    assert not (paths["images"] / "CXR1_1_IM-0001-3001.png").exists()  # extraction marked done: skipped


def test_extraction_refuses_paths_outside_the_folder(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tgz"
    archive.write_bytes(_tgz({"../escaped.txt": b"gotcha"}))
    with pytest.raises(DownloadError, match="Cannot extract .*evil.tgz"):
        extract_archive(archive, tmp_path / "out", progress=False)
    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "out" / ".extracted").exists()


def test_command_line(server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server.files["/c/" + OPENI_REPORTS] = _tgz({"ecgen-radiology/1.xml": b"<eCitation/>"})
    assert main([str(tmp_path), "--reports-only", "--base-url", f"{server.base_url}/c"]) == 0
    assert (tmp_path / OPENI_REPORTS).is_file()
    assert main([str(tmp_path / "other"), "--base-url", f"{server.base_url}/nothing"]) == 1
    assert "HTTP 404" in capsys.readouterr().err
