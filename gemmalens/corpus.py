"""Text corpora as fixed windows of token ids, what ``gemmalens harvest`` runs the model over.

Documents are tokenized without their bos and joined into one stream, a bos between two documents; the stream
is cut into windows of ``context - 1`` tokens, each given a leading bos (the packing SAELens' activation
cache uses), and a last partial window is dropped. The windows are kept in the cache folder under a name
derived from everything that makes them (the corpus's bytes or name, the text field, the split, the context,
the limit and the tokenizer), so a resumed harvest reads the very windows it started with.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import ConfigError
from .files import write_atomic
from .prompts import Prompt

CATEGORY = "corpus"


def read_texts(source: str, field: str = "text", split: str = "train") -> Iterator[str]:
    """The documents of a corpus: a .jsonl file (one JSON object per line, its text under ``field``), a .txt
    file (one document per line), a folder saved by ``datasets`` (``save_to_disk``), or a Hub dataset id."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".txt":
        with open(path, encoding="utf-8") as handle:
            yield from (line.rstrip("\n") for line in handle if line.strip())
        return
    if path.is_file():
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ConfigError(f"{path}, line {number}: not JSON ({error.msg}); a .jsonl corpus holds one "
                                      f"JSON object per line, its text under {field!r}") from None
                if not isinstance(row, dict) or not isinstance(row.get(field), str):
                    raise ConfigError(f"{path}, line {number}: no text under {field!r} (keys: "
                                      f"{sorted(row) if isinstance(row, dict) else type(row).__name__}); "
                                      "choose the field with --text-field")
                yield row[field]
        return
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{source}: not a file; reading a datasets folder or Hub dataset needs the dataset "
                          "extra: pip install 'gemmalens[dataset]'") from None
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ConfigError(f"{source}: no split {split!r} (it has {', '.join(loaded)}); choose it with --split")
            loaded = loaded[split]
    else:
        loaded = datasets.load_dataset(source, split=split, streaming=True)
    for row in loaded:
        if not isinstance(row.get(field), str):
            raise ConfigError(f"{source}: no text column {field!r} (columns: {sorted(row)}); choose it with "
                              "--text-field")
        yield row[field]


def pack(texts, tokenizer, context: int, limit: int | None = None) -> np.ndarray:
    """Windows ``[N, context]`` int32: a bos, then ``context - 1`` tokens of the documents' stream."""
    if context < 2:
        raise ConfigError(f"--context {context}: a window holds a bos and at least one token")
    size, rows, stream = context - 1, [], []
    for text in texts:
        if stream:
            stream.append(tokenizer.bos_id)
        stream.extend(tokenizer.backend.encode(text, add_special_tokens=False).ids)
        while len(stream) >= size and (limit is None or len(rows) < limit):
            rows.append([tokenizer.bos_id, *stream[:size]])
            del stream[:size]
        if limit is not None and len(rows) >= limit:
            break
    return np.asarray(rows, dtype=np.int32).reshape(-1, context)


def _identity(source: str, field: str, split: str, context: int, limit: int | None, tokenizer_file: Path) -> str:
    digest = hashlib.sha256()
    path = Path(source).expanduser()
    if path.is_file():
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    else:
        digest.update(str(path.resolve() if path.exists() else source).encode())
    digest.update(json.dumps([field, split, context, limit]).encode())
    digest.update(tokenizer_file.read_bytes() if tokenizer_file.exists() else b"")
    return digest.hexdigest()[:24]


def corpus_windows(source: str, tokenizer, tokenizer_file: Path, context: int, cache: Path, field: str = "text",
                   split: str = "train", limit: int | None = None) -> tuple[Path, int]:
    """The windows of a corpus, packed once and kept in the folder ``cache``: their file and count."""
    target = cache / f"{_identity(source, field, split, context, limit, tokenizer_file)}.npy"
    if not target.exists():
        windows = pack(read_texts(source, field, split), tokenizer, context, limit)
        if not len(windows):
            raise ConfigError(f"{source}: fewer than {context - 1} tokens of text; nothing to harvest at "
                              f"--context {context}")
        target.parent.mkdir(parents=True, exist_ok=True)
        data = io.BytesIO()
        np.save(data, windows)
        write_atomic(target, data.getvalue())
    return target, int(np.load(target, mmap_mode="r").shape[0])


def corpus_prompts(path: str | Path) -> list[Prompt]:
    """The windows of a packed corpus as prompts with given token ids."""
    try:
        windows = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise ConfigError(f"{path}: the corpus windows of this harvest are gone from the cache; start the "
                          "harvest again (it packs them anew)") from None
    return [Prompt(i, f"window {i}", CATEGORY, None, tuple(int(t) for t in row)) for i, row in enumerate(windows)]
