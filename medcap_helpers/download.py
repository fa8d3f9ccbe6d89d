"""Resumable, verified downloads, and the Open-i IU X-Ray archives.

:func:`download_file` writes to ``<dest>.part``, resumes it with an HTTP ``Range`` request (starting
over when the server ignores ``Range``), checks the SHA-256 when given (else the announced length),
and renames onto ``dest`` only once complete. :func:`download_openi` fetches ``NLMCXR_png.tgz`` and
``NLMCXR_reports.tgz`` and extracts the images safely (tarfile's ``data`` filter).

Command line: ``python -m medcap_helpers.download data/``.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import socket
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from medcap_helpers.errors import DownloadError

OPENI_BASE_URL = "https://openi.nlm.nih.gov/imgs/collections/"
OPENI_IMAGES = "NLMCXR_png.tgz"
OPENI_REPORTS = "NLMCXR_reports.tgz"
EXTRACTED_MARKER = ".extracted"
USER_AGENT = "medcap-downloader/0.1"


def download_file(url: str, dest: str | Path, expected_sha256: str | None = None,
                  expected_size: int | None = None, chunk_size: int = 1 << 20, timeout: float = 60.0,
                  retries: int = 2, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``); return ``dest``.

    An existing ``dest`` that passes the checks is kept without a request. A connection that drops is
    resumed up to ``retries`` times; after that :class:`DownloadError` is raised and ``dest.part``
    is kept, so calling again resumes it.
    """
    dest = Path(dest)
    if expected_sha256 is not None:
        expected_sha256 = expected_sha256.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", expected_sha256):
            raise ValueError(f"expected_sha256 for {url} is not a SHA-256 hex digest: {expected_sha256!r}.")
    if dest.is_file() and _is_complete(dest, expected_sha256, expected_size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        try:
            total = _fetch_into(url, part, chunk_size, timeout, progress)
            break
        except _Interrupted as err:
            attempt += 1
            if attempt > retries:
                raise DownloadError(f"Download of {url} was interrupted after {part.stat().st_size:,} bytes "
                                    f"({err}); run the same command again to resume from {part}.") from None
    size = part.stat().st_size
    if expected_sha256 is not None:
        digest = sha256_file(part)
        if digest != expected_sha256:
            part.unlink()
            raise DownloadError(f"Checksum mismatch for {url}: expected SHA-256 {expected_sha256}, got {digest}. "
                                "The partial file was deleted; run again to download it afresh, or check the "
                                "expected checksum.")
    elif total is not None and size != total:
        part.unlink()
        raise DownloadError(f"Size mismatch for {url}: the server announced {total:,} bytes, {size:,} arrived. "
                            "The partial file was deleted; run again.")
    if expected_size is not None and size != expected_size:
        part.unlink()
        raise DownloadError(f"Size mismatch for {url}: expected {expected_size:,} bytes, got {size:,}.")
    os.replace(part, dest)
    return dest


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Interrupted(Exception):
    """The transfer stopped early; the bytes so far are in the .part file."""


def _fetch_into(url: str, part: Path, chunk_size: int, timeout: float, progress: bool) -> int | None:
    """Append the rest of ``url`` to ``part``; return the full size when the server told it."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            # Range past the end: the .part may already be whole; let the checks decide, else restart.
            total = _content_range_total(err.headers.get("Content-Range"))
            if total == offset:
                return total
            part.unlink()
            return _fetch_into(url, part, chunk_size, timeout, progress)
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}. Check the address, or download the file "
                            f"by hand to {part.with_suffix('')}.") from None
    except (urllib.error.URLError, socket.timeout, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"Cannot reach {url}: {reason}. Check the internet connection (or a proxy), or "
                            f"download the file by hand to {part.with_suffix('')}.") from None
    with response:
        length = _int_or_none(response.headers.get("Content-Length"))
        if offset and response.status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != offset:
                raise DownloadError(f"{url}: asked to resume at byte {offset} but the server sent from {start}.")
            total = _content_range_total(response.headers.get("Content-Range"))
            mode = "ab"
        else:  # 200: a fresh download, or a server that ignores Range -> start over
            offset, total, mode = 0, length, "wb"
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=Path(part.name).stem, disable=not progress)
        received = 0
        with open(part, mode) as handle, bar:
            while True:
                try:
                    chunk = response.read(chunk_size)
                except (http.client.HTTPException, OSError) as err:  # reset, timeout, IncompleteRead
                    raise _Interrupted(type(err).__name__) from None
                if not chunk:
                    break
                handle.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if length is not None and received < length:
            raise _Interrupted(f"{received:,} of {length:,} bytes")
    return total


def _is_complete(path: Path, expected_sha256: str | None, expected_size: int | None) -> bool:
    if expected_size is not None and path.stat().st_size != expected_size:
        return False
    return expected_sha256 is None or sha256_file(path) == expected_sha256


def _content_range_start(value: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/", value or "")
    return int(match.group(1)) if match else None


def _content_range_total(value: str | None) -> int | None:
    match = re.search(r"/(\d+)\s*$", value or "")
    return int(match.group(1)) if match else None


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value and value.strip().isdigit() else None


# --- archives -----------------------------------------------------------------------------------
def extract_archive(archive: str | Path, target: str | Path, progress: bool = True) -> Path:
    """Extract a tar archive into ``target`` safely; skipped when a previous extraction completed.

    Uses tarfile's ``data`` filter: no absolute paths, no ``..``, no links out of ``target``, no
    device files. A marker file is written last, so an interrupted extraction is redone.
    """
    archive, target = Path(archive), Path(target)
    marker = target / EXTRACTED_MARKER
    if marker.is_file() and marker.read_text().strip() == archive.name:
        return target
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in tqdm(members, desc=f"Extracting {archive.name}", unit="file", disable=not progress):
                _extract_member(tar, member, target)
    except (tarfile.TarError, OSError) as err:
        raise DownloadError(f"Cannot extract {archive}: {err}. Delete it and download it again.") from None
    marker.write_text(archive.name + "\n")
    return target


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    if hasattr(tarfile, "data_filter"):
        tar.extract(member, target, filter="data")
        return
    # Python without extraction filters (< 3.11.4): allow only plain files and folders inside target.
    resolved = (target / member.name).resolve()
    if not (member.isfile() or member.isdir()) or not resolved.is_relative_to(target.resolve()):
        raise tarfile.TarError(f"refusing to extract {member.name!r} (link, device or path outside the folder)")
    tar.extract(member, target)


def download_openi(dest_dir: str | Path = "data", base_url: str = OPENI_BASE_URL, images: bool = True,
                   reports: bool = True, extract: bool = True, progress: bool = True) -> dict[str, Path]:
    """Fetch the Open-i IU X-Ray archives into ``dest_dir`` and extract the PNGs.

    Returns ``{"reports": <dest>/NLMCXR_reports.tgz, "images": <dest>/NLMCXR_png/}`` (the folder is
    the archive itself when ``extract=False``): exactly what the ``full`` profile's ``data_path`` and
    ``images_dir`` expect. The report archive is read directly, it needs no extraction.
    """
    dest_dir = Path(dest_dir)
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    paths: dict[str, Path] = {}
    if reports:
        paths["reports"] = download_file(base_url + OPENI_REPORTS, dest_dir / OPENI_REPORTS, progress=progress)
    if images:
        archive = download_file(base_url + OPENI_IMAGES, dest_dir / OPENI_IMAGES, progress=progress)
        paths["images"] = extract_archive(archive, dest_dir / "NLMCXR_png", progress) if extract else archive
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download the IU X-Ray (Open-i) images and reports.")
    parser.add_argument("dest", nargs="?", default="data", help="folder to download into (default: data)")
    parser.add_argument("--reports-only", action="store_true", help="skip the ~1.3 GB image archive")
    parser.add_argument("--no-extract", action="store_true", help="keep NLMCXR_png.tgz packed")
    parser.add_argument("--base-url", default=OPENI_BASE_URL)
    args = parser.parse_args(argv)
    try:
        paths = download_openi(args.dest, args.base_url, images=not args.reports_only,
                               extract=not args.no_extract)
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    if "images" in paths and paths["images"].is_dir():
        print(f"Use: --set data_source=openi --set data_path={paths.get('reports', '...')} "
              f"--set images_dir={paths['images']}")
    return 0


__all__ = ["DownloadError", "OPENI_BASE_URL", "download_file", "download_openi", "extract_archive", "sha256_file"]

if __name__ == "__main__":
    raise SystemExit(main())
