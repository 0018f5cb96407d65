"""Getting the files of weights.toml into the cache, and checking them every time they are used.

Each entry becomes one file in the cache (`cache_dir()`), named after the entry. A file is used only when its sha256 and
size match what it must be:
- the manifest's sha256/size for files kept as downloaded;
- for an official checkpoint (`format = "dve-palette"`, converted to talkedit weights after download), the converted
  file's hash recorded beside it in `<file>.json`, together with the hash of the checkpoint it came from;
- for an entry the manifest gives no hash for, the hash recorded at the first fetch (said loudly when recorded).

Hub entries go through huggingface_hub (HF_ENDPOINT, HF_HOME, HF_TOKEN and HF_HUB_OFFLINE apply); URL entries are
plain HTTP(S) downloads that resume where an interrupted one stopped. This is the only module that uses the network.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import WeightsError
from .files import atomic_path, write_atomic
from .manifest import WeightsEntry, cache_dir, file_sha256, first_line

log = logging.getLogger("talkedit")

# progress(name, bytes done, bytes total or None)
DownloadProgress = Callable[[str, int, "int | None"], None]
TIMEOUT = 30.0  # seconds without data before a download is given up
CHUNK = 1 << 20


def _no_progress(name: str, done: int, total: int | None) -> None:
    pass


def offline_from_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def fix_command(entry: WeightsEntry) -> str:
    return f"talkedit download-weights {entry.name}"


# ---------------------------------------------------------------------------------------------------------------
# The cache and its checks


@dataclass(frozen=True)
class CacheStatus:
    entry: WeightsEntry
    path: Path
    state: str  # "valid", "missing", "damaged", or "unrecorded" (put there by hand: nothing to verify it against)
    actual_sha256: str | None = None
    expected_sha256: str | None = None
    unverified: bool = False  # the expected hash was recorded on first fetch, not published

    @property
    def valid(self) -> bool:
        return self.state == "valid"


def record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(record_path(path).read_text())
    except (OSError, ValueError):
        return None


def check_cached(entry: WeightsEntry, root: Path | None = None) -> CacheStatus:
    """Is the entry's cached file there and exactly what it must be? Reads the whole file (sha256)."""
    path = (root or cache_dir()) / entry.cache_name
    if not path.is_file():
        return CacheStatus(entry, path, "missing")
    record = _read_record(path)
    if entry.format == "dve-palette" or entry.sha256 is None:
        if record is None or (entry.sha256 and record.get("source_sha256") != entry.sha256):
            return CacheStatus(entry, path, "unrecorded", expected_sha256=entry.sha256)
        expected, size = record.get("sha256"), record.get("size")
        unverified = not record.get("source_verified", False)
    else:
        expected, size, unverified = entry.sha256, entry.size, False
    actual = file_sha256(path)
    intact = actual == expected and (size is None or path.stat().st_size == size)
    return CacheStatus(entry, path, "valid" if intact else "damaged", actual, expected, unverified)


def damage(status: CacheStatus) -> str:
    """What is wrong with a cached file that is not valid, with both hashes when it has been changed."""
    if status.state == "unrecorded":
        return f"{status.path}: was not installed by talkedit, so there is no hash to verify it against"
    return f"{status.path}: damaged or tampered with (sha256 {status.actual_sha256}, expected {status.expected_sha256})"


def damaged_message(status: CacheStatus) -> str:
    if status.state == "unrecorded":
        return damage(status)
    return f"{damage(status)}; run `{fix_command(status.entry)}` to fetch it again"


def ensure(
    entry: WeightsEntry,
    *,
    offline: bool | None = None,
    progress: DownloadProgress = _no_progress,
    root: Path | None = None,
    timeout: float = TIMEOUT,
) -> Path:
    """The path of the entry's verified cached file, fetching (or re-fetching a damaged one) unless offline."""
    offline = offline_from_env() if offline is None else offline
    status = check_cached(entry, root)
    log.info("%s: %s in the cache (%s)", entry.name, status.state, status.path)
    if status.valid:
        return status.path
    if not (entry.url or entry.repo):
        problem = f"{entry.name} is not in the cache" if status.state == "missing" else damaged_message(status)
        steps = entry.manual or "fetch the file by hand"
        raise WeightsError(
            f"{problem}. talkedit cannot download it itself: {steps}, then run "
            f"`talkedit download-weights {entry.name} --from FILE`."
        )
    if offline:
        if status.state in ("damaged", "unrecorded"):
            raise WeightsError(damaged_message(status) + " (downloads are off now).")
        raise WeightsError(
            f"{entry.name}: not in the cache ({status.path}) and downloads are off (--offline or HF_HUB_OFFLINE); "
            f"run `{fix_command(entry)}` online, or `talkedit download-weights {entry.name} --from FILE`."
        )
    try:
        return fetch(entry, progress=progress, root=root, timeout=timeout)
    except WeightsError as exc:
        if status.state == "missing":
            raise
        raise WeightsError(f"{damage(status)}, and fetching it again failed: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# Fetching


def _partial_dir(root: Path) -> Path:
    path = root / ".partial"
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch(
    entry: WeightsEntry,
    *,
    progress: DownloadProgress = _no_progress,
    root: Path | None = None,
    timeout: float = TIMEOUT,
) -> Path:
    """Download an entry, verify it against the manifest and install it in the cache. Returns the installed path."""
    root = root or cache_dir()
    partial = _partial_dir(root)
    log.info("fetching %s from %s", entry.name, f"{entry.repo}@{entry.revision}" if entry.repo else entry.url)
    if entry.repo:
        downloaded = _download_hub(entry, partial / entry.name, progress, timeout)
    else:
        downloaded = _download_url(entry, partial / f"{entry.name}.download", progress, timeout)
    try:
        return install(entry, downloaded, root=root)
    finally:
        if entry.repo:
            shutil.rmtree(partial / entry.name, ignore_errors=True)
        downloaded.unlink(missing_ok=True)


def _download_url(entry: WeightsEntry, part: Path, progress: DownloadProgress, timeout: float) -> Path:
    """HTTP(S) download into `part`, resuming from what an earlier attempt left there."""
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(entry.url, headers={"User-Agent": f"talkedit/{__version__}"})
    if done:
        request.add_header("Range", f"bytes={done}-")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if done and response.status != 206:
                done = 0  # the server ignored the range: start over
            length = response.headers.get("Content-Length")
            total = done + int(length) if length is not None else entry.size
            with part.open("ab" if done else "wb") as f:
                while block := response.read(CHUNK):
                    f.write(block)
                    done += len(block)
                    progress(entry.name, done, total)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and done:  # the range starts at the end: the earlier attempt had it all
            return part
        raise WeightsError(
            f"{entry.name}: download from {entry.url} failed (HTTP {exc.code}); try again later."
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WeightsError(
            f"{entry.name}: download from {entry.url} failed ({reason}); check the connection and run the command "
            "again (it resumes), or fetch the file by hand and use --from FILE."
        ) from None
    return part


def _download_hub(entry: WeightsEntry, folder: Path, progress: DownloadProgress, timeout: float) -> Path:
    """Download a pinned file from the Hugging Face Hub (or HF_ENDPOINT) into `folder` through huggingface_hub."""
    from huggingface_hub import hf_hub_download
    from tqdm.auto import tqdm

    class Reporter(tqdm):  # huggingface_hub reports through a tqdm class; forward to our callback
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self.done = 0

        def update(self, n=1):
            self.done += n or 0
            progress(entry.name, self.done, entry.size)

    try:
        path = hf_hub_download(
            entry.repo,
            entry.filename,
            revision=entry.revision,
            local_dir=folder,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            etag_timeout=timeout,
            tqdm_class=Reporter,
            library_name="talkedit",
            library_version=__version__,
        )
    except Exception as exc:  # huggingface_hub raises many types (HTTP, offline, timeouts, missing revisions)
        raise WeightsError(
            f"{entry.name}: download of {entry.repo}/{entry.filename}@{(entry.revision or '')[:12]} failed "
            f"({first_line(exc)}); check the connection and run the command again."
        ) from None
    return Path(path)


def install(entry: WeightsEntry, file: Path, *, root: Path | None = None) -> Path:
    """Check a fetched file against its entry and move (or convert) it into the cache.

    A file that does not match the manifest's size or sha256 is refused and nothing is installed. For an entry without
    a published hash the file's hash is recorded as the one to expect from now on.
    """
    root = root or cache_dir()
    size, sha = file.stat().st_size, file_sha256(file)
    if entry.size is not None and size != entry.size:
        raise WeightsError(f"{entry.name}: refused {file}: size {size} bytes, the manifest says {entry.size}.")
    if entry.sha256 is not None and sha != entry.sha256:
        raise WeightsError(f"{entry.name}: refused {file}: sha256 {sha}, the manifest says {entry.sha256}.")
    if entry.format == "syncnet":  # refuse anything that is not SyncNet weights before it is cached
        from .syncnet import load_syncnet

        load_syncnet(file)
    target = root / entry.cache_name
    record = {"source_sha256": sha, "source_size": size, "source_verified": entry.sha256 is not None}
    try:
        root.mkdir(parents=True, exist_ok=True)
        if entry.format == "dve-palette":
            from .checkpoint import import_checkpoint

            import_checkpoint(file, target)
        else:
            with atomic_path(target) as tmp:
                shutil.copyfile(file, tmp)
        if entry.format == "dve-palette" or entry.sha256 is None:
            record.update(sha256=file_sha256(target), size=target.stat().st_size)
            write_atomic(record_path(target), json.dumps(record, indent=1).encode())
    except OSError as exc:
        raise WeightsError(
            f"{target}: cannot install {entry.name} ({exc.strerror or exc}); free some space there, or use another "
            "cache (--cache-dir or TALKEDIT_HOME)."
        ) from None
    return target


def _install_from_zip(entry: WeightsEntry, file: Path, root: Path | None) -> Path:
    """Install the *_Network.pth inside the zip the official model is published in. Errors name the zip and the
    member, not the temporary folder it was extracted to."""
    try:
        with zipfile.ZipFile(file) as archive, tempfile.TemporaryDirectory() as tmp:
            members = sorted(m for m in archive.namelist() if m.endswith("_Network.pth"))
            if not members:
                raise WeightsError(f"{file}: the zip holds no *_Network.pth checkpoint; give the checkpoint itself.")
            extracted = Path(archive.extract(members[-1], tmp))
            try:
                return install(entry, extracted, root=root)
            except WeightsError as exc:
                raise WeightsError(str(exc).replace(str(extracted), f"{file} ({members[-1]})")) from None
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise WeightsError(
            f"{file}: not a readable zip ({exc}); download it again, or give the checkpoint itself."
        ) from None
    except OSError as exc:
        raise WeightsError(f"{file}: cannot extract the checkpoint ({exc.strerror or exc}); free some space.") from None


def install_from(entry: WeightsEntry, file: str | os.PathLike, *, root: Path | None = None) -> tuple[Path, str | None]:
    """Install a file the user fetched by hand. An official checkpoint may be given as the zip it is published in.

    Returns (installed path, a warning to show loudly or None).
    """
    file = Path(file).expanduser()
    if not file.is_file():
        raise WeightsError(f"{file}: no such file; give the file you downloaded for {entry.name}.")
    if entry.format == "dve-palette" and file.suffix.lower() == ".zip":  # torch.save writes zips too
        installed = _install_from_zip(entry, file, root)
    else:
        installed = install(entry, file, root=root)
    warning = None
    if entry.sha256 is None:
        recorded = (_read_record(installed) or {}).get("source_sha256")
        given = f"sha256 {recorded}"
        if file.suffix.lower() == ".zip" and entry.format == "dve-palette":
            given = f"sha256 {file_sha256(file)} (the zip; the checkpoint inside: {recorded})"
        warning = (
            f"{entry.name} has no published hash, so {file.name} cannot be verified. Its {given} is now recorded, "
            "and the cached file is checked on every use. Compare it with the hash others report."
        )
    return installed, warning
