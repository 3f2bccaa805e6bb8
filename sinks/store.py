"""A folder on any storage fsspec reaches: a local path, or a URL (``s3://``, ``gs://``, ``memory://`` ...).

``Store`` writes whole files so that a reader sees a file complete or not at all: locally through a synced
temporary file and a rename (gemmalens/files.py); on object storage an object appears only when its upload
completes, so it is written in place. Every failure names the file and the storage.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator

from gemmalens.errors import GemmalensError
from gemmalens.files import atomic_file, dump_json, write_failed


class StoreError(GemmalensError):
    """A dataset destination that cannot be used (no fsspec driver for it, unreachable, refused)."""


def open_store(dest: str | Path) -> "Store":
    """The store at ``dest``; a URL's scheme needs its fsspec driver (s3fs for ``s3://``, gcsfs for ``gs://``)."""
    try:
        import fsspec
    except ImportError:
        raise StoreError("writing datasets needs the dataset extra: pip install 'gemmalens[dataset]'") from None
    text = str(dest)
    try:
        fs, root = fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as error:
        raise StoreError(f"{text}: {error}; for s3:// install s3fs, for gs:// gcsfs") from None
    return Store(fs, root, text)


class Store:
    """One folder of a filesystem: files by name (no subfolders)."""

    def __init__(self, fs, root: str, url: str):
        self.fs, self.root, self.url = fs, root.rstrip("/"), url
        self.local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))

    def __str__(self) -> str:
        return self.url

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def make(self) -> None:
        try:
            self.fs.makedirs(self.root, exist_ok=True)
        except Exception as error:
            raise StoreError(f"cannot create {self.url}: {error}") from None

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def names(self, pattern: str = "*") -> list[str]:
        """The files of the folder matching a glob ``pattern``."""
        try:
            found = self.fs.glob(self.path(pattern))
        except FileNotFoundError:
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in found)

    def read_json(self, name: str) -> Any | None:
        """The JSON file ``name``, or None if there is none."""
        try:
            with self.fs.open(self.path(name), "rb") as handle:
                return json.loads(handle.read().decode("utf-8"))
        except FileNotFoundError:
            return None

    def write_json(self, name: str, value: Any) -> None:
        if self.local:
            dump_json(self.path(name), value)
            return
        data = (json.dumps(value, indent=2) + "\n").encode("utf-8")
        try:
            with self.fs.open(self.path(name), "wb") as handle:
                handle.write(data)
        except OSError as error:
            raise write_failed(str(self) + "/" + name, error) from None
        except Exception as error:
            raise StoreError(f"cannot write {self.url}/{name}: {error}") from None

    @contextlib.contextmanager
    def writing(self, name: str) -> Iterator[Any]:
        """A binary file to write ``name`` through: whole once the block ends without an error, else absent."""
        if self.local:
            with atomic_file(self.path(name)) as handle:
                yield handle
            return
        handle = self.fs.open(self.path(name), "wb")
        try:
            yield handle
        except BaseException:
            with contextlib.suppress(Exception):
                handle.discard() if hasattr(handle, "discard") else None
            raise
        try:
            handle.close()
        except Exception as error:
            raise StoreError(f"cannot write {self.url}/{name}: {error}") from None

    def copy(self, name: str, to: str) -> None:
        self.fs.copy(self.path(name), self.path(to))

    def remove(self, names: list[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path(name))
