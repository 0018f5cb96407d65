"""The weights.toml manifest and the model cache: entries, cache paths, sha256. Imports no torch and no network code,
so that `download`, `weights` and `analysis` can all use it without importing each other.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import WeightsError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class WeightsEntry:
    """One file of weights.toml."""

    name: str
    format: str = "file"  # "talkedit" weights, "dve-palette" official checkpoint, or any other "file"
    url: str | None = None  # plain HTTPS source
    repo: str | None = None  # Hugging Face Hub source: repo, filename, pinned revision
    filename: str | None = None
    revision: str | None = None
    sha256: str | None = None
    size: int | None = None
    license: str = ""
    description: str = ""
    source: str | None = None  # where a human finds the original
    manual: str | None = None  # how to fetch it by hand, when talkedit cannot download it

    @property
    def cache_name(self) -> str:
        """File name inside the cache: models are stored as talkedit weights, other files keep their suffix."""
        if self.format in ("talkedit", "dve-palette"):
            return f"{self.name}.safetensors"
        suffix = Path(self.filename or self.url or "").suffix
        return f"{self.name}{suffix}"


def manifest_path() -> Path:
    """The weights.toml shipped in the package, or the repository's own in a source checkout."""
    packaged = Path(__file__).with_name("weights.toml")
    return packaged if packaged.exists() else Path(__file__).resolve().parent.parent / "weights.toml"


def read_manifest(path: str | os.PathLike | None = None) -> tuple[str | None, dict[str, WeightsEntry]]:
    """Parse a manifest. Returns (default model name, entries by name)."""
    path = Path(path) if path is not None else manifest_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read the weights manifest ({exc.strerror}).") from None
    except tomllib.TOMLDecodeError as exc:
        raise WeightsError(f"{path}: not valid TOML ({exc}); fix the manifest.") from None
    entries = {}
    for name, table in data.get("weights", {}).items():
        try:
            entries[name] = WeightsEntry(name=name, **table)
        except TypeError as exc:
            raise WeightsError(f"{path}: entry [weights.{name}] is malformed ({exc}).") from None
    return data.get("default"), entries


def cache_dir() -> Path:
    """Where weights live: $TALKEDIT_HOME, else $XDG_CACHE_HOME/talkedit, else ~/.cache/talkedit."""
    if home := os.environ.get("TALKEDIT_HOME"):
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "talkedit"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
