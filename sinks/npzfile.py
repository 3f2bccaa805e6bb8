"""Writing one ``.npz`` file fast: the zip laid out by hand in reused memory, then one write to disk.

An archiver thread writes a step file of dozens of arrays several times a
second. Through ``zipfile`` each entry costs a good deal of Python with the GIL
held (entry objects, header rewrites, npy header formatting), which caps one
archiver however many writer threads it has. Here an entry is a few
``struct.pack`` calls: its values are copied (or widened from bfloat16)
straight to their place in the file's memory and checksummed there, outside
the GIL.

The file is what ``numpy.savez`` writes (``compress``: what ``savez_compressed``
writes, deflated by ISA-L at its level 1): a zip of ``<name>.npy`` entries with
ZIP64 records, so plain ``numpy.load`` and ``zipfile`` read it. ISA-L's deflate
and checksum (``isal``) are several times as fast as zlib's on these values, with
files no larger. Stored entries start their values on a 64-byte boundary (the
local header's extra field pads them), as the npy format intends for memory
mapping.
"""

from __future__ import annotations

import errno
import functools
import io
import mmap
import os
import struct
import threading
import time
from pathlib import Path

import numpy as np
from isal import isal_zlib

from gemmalens.files import partial_path, write_failed
from gemmalens.wire import bfloat16_to_float32

ALIGN = 4096  # direct I/O wants memory, length and offset in multiples of the block size
NPY_ALIGN = 64  # where stored values start, relative to the file
DEFLATE_LEVEL = 1  # of ISA-L's 0-3: packs tighter than 0 and, unlike 2 and 3, keeps its speed on small arrays

_LOCAL = struct.Struct("<IHHHHHIIIHH")  # signature, version, flags, method, time, date, crc, sizes, name/extra lengths
_LOCAL_ZIP64 = struct.Struct("<HHQQ")  # extra field 1: uncompressed, compressed size
_PADDING = struct.Struct("<HH")  # an extra field of our own id whose only content is padding
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_CENTRAL_ZIP64 = struct.Struct("<HHQQQ")  # extra field 1: uncompressed, compressed size, local header offset
_END_ZIP64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR_ZIP64 = struct.Struct("<IIQI")
_END = struct.Struct("<IHHHHIIH")
_VERSION = 45  # ZIP64
_MADE_BY = 3 << 8 | _VERSION  # unix
_PADDING_ID = 0x676C  # "gl"
_FULL = 0xFFFFFFFF  # a 32-bit field whose value is in the ZIP64 record


def write_npz(path: Path, arrays: dict[str, np.ndarray], compress: bool, widen: frozenset[str] = frozenset()) -> None:
    """Writes ``arrays`` as ``numpy.savez`` (``compress``: ``savez_compressed``, deflated by ISA-L) would, through a
    synced temporary file renamed to ``path``. The names in ``widen`` hold bfloat16 patterns (uint16), stored as
    float32 (exact) so that plain ``numpy.load`` reads values."""
    staged = _staging()
    staged.clear()  # a failed write may have left a file behind
    when = time.localtime()
    stamp = ((when.tm_year - 1980) << 9 | when.tm_mon << 5 | when.tm_mday, when.tm_hour << 11 | when.tm_min << 5
             | when.tm_sec // 2)
    entries = [_entry(staged, name, array, name in widen, compress, stamp) for name, array in arrays.items()]
    _directory(staged, entries, stamp)
    partial = partial_path(path)
    try:
        staged.write_to(partial)
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise write_failed(path, error) from None


def _entry(staged: StagedFile, name: str, array: np.ndarray, widen: bool, compress: bool, stamp) -> tuple:
    """Appends one ``<name>.npy`` entry (local header, npy header, values); returns its central directory fields."""
    array = np.asarray(array, order="C")
    dtype = np.dtype(np.float32) if widen else array.dtype
    header = _npy_header(dtype.str, array.shape)
    filename = f"{name}.npy".encode()
    flags = 0 if filename.isascii() else 0x800  # utf-8 name
    start = staged.size
    fixed = start + _LOCAL.size + len(filename) + _LOCAL_ZIP64.size
    pad = 0 if compress else -fixed % NPY_ALIGN
    pad += NPY_ALIGN if 0 < pad < _PADDING.size else 0
    body = fixed + pad  # where the npy file begins
    size = len(header) + array.size * dtype.itemsize
    if compress:
        values = staged.widened(array) if widen else array
        raw = values.reshape(-1).view(np.uint8)
        crc = isal_zlib.crc32(raw, isal_zlib.crc32(header))
        deflate = isal_zlib.compressobj(DEFLATE_LEVEL, isal_zlib.DEFLATED, -15)  # raw deflate, as zip entries hold
        data = b"".join((deflate.compress(header), deflate.compress(raw), deflate.flush()))
        stored = len(data)
        staged.put(body, data)
    else:
        stored = size
        staged.reserve(body + size)
        staged.put(body, header)
        target = staged.bytes[body + len(header) : body + size]
        if widen:  # bfloat16 patterns to float32 values, in place
            bfloat16_to_float32(array, out=target.view(np.uint32).reshape(array.shape))
        else:
            target[:] = array.reshape(-1).view(np.uint8)
        crc = isal_zlib.crc32(target, isal_zlib.crc32(header))
    method = 8 if compress else 0  # deflate, stored
    local = _LOCAL.pack(0x04034B50, _VERSION, flags, method, stamp[1], stamp[0], crc, _FULL, _FULL, len(filename),
                        _LOCAL_ZIP64.size + pad)
    padding = _PADDING.pack(_PADDING_ID, pad - _PADDING.size) + bytes(pad - _PADDING.size) if pad else b""
    staged.put(start, b"".join((local, filename, _LOCAL_ZIP64.pack(1, 16, size, stored), padding)))
    staged.size = body + stored
    return filename, flags, method, crc, stored, size, start


def _directory(staged: StagedFile, entries: list[tuple], stamp) -> None:
    """Appends the central directory and the ZIP64 and classic end records."""
    start, parts = staged.size, []
    for filename, flags, method, crc, stored, size, offset in entries:
        parts += [_CENTRAL.pack(0x02014B50, _MADE_BY, _VERSION, flags, method, stamp[1], stamp[0], crc, _FULL, _FULL,
                                len(filename), _CENTRAL_ZIP64.size, 0, 0, 0, 0o644 << 16, _FULL),
                  filename, _CENTRAL_ZIP64.pack(1, 24, size, stored, offset)]
    directory = b"".join(parts)
    end = start + len(directory)
    count = len(entries)
    staged.put(start, b"".join((
        directory,
        _END_ZIP64.pack(0x06064B50, _END_ZIP64.size - 12, _MADE_BY, _VERSION, 0, 0, count, count, len(directory),
                        start),
        _LOCATOR_ZIP64.pack(0x07064B50, 0, end, 1),
        _END.pack(0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF), min(len(directory), _FULL),
                  min(start, _FULL), 0),
    )))
    staged.size = end + _END_ZIP64.size + _LOCATOR_ZIP64.size + _END.size


@functools.lru_cache(maxsize=1024)
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """The npy format's header for these values, exactly as numpy writes it (cached: steps repeat shapes)."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": descr, "fortran_order": False, "shape": shape})
    return out.getvalue()


class StagedFile:
    """Page-aligned memory a file is assembled in, reused file after file (no fresh pages for every file).

    ``write_to`` puts the assembled bytes in a file with one system call per 64 MiB, directly from this memory
    (``O_DIRECT``) where the file system takes it, through the page cache elsewhere, and syncs it.
    """

    CHUNK = 1 << 26
    KEEP = 1 << 28  # memory kept between files; a larger file's memory goes back once it is written

    def __init__(self, capacity: int = 1 << 24):
        self.capacity = _aligned(capacity)
        self._map(self.capacity)
        self.size = 0
        self._scratch = np.empty(0, dtype=np.uint32)

    def clear(self) -> None:
        self.size = 0

    def put(self, offset: int, data) -> None:
        """Copies ``data`` (bytes-like) to ``offset``, growing the memory if needed; the size is the caller's."""
        data = np.frombuffer(data, dtype=np.uint8)
        self.reserve(offset + data.size)
        self.bytes[offset : offset + data.size] = data  # numpy copies without holding the GIL

    def reserve(self, size: int) -> None:
        if size > self.bytes.size:
            old = self.bytes
            self._map(_aligned(max(size, 2 * old.size)))
            self.bytes[: self.size] = old[: self.size]  # the old map goes when nothing views it

    def widened(self, bits: np.ndarray) -> np.ndarray:
        """bfloat16 patterns as float32, in memory reused from one call to the next (valid until the next call)."""
        if self._scratch.size < bits.size:
            self._scratch = np.empty(bits.size, dtype=np.uint32)
        return bfloat16_to_float32(bits, out=self._scratch[: bits.size].reshape(bits.shape))

    def write_to(self, path: Path) -> None:
        """Writes the assembled file to ``path`` (created or truncated) and syncs it; then empties this memory."""
        descriptor = self._write_direct(path)
        if descriptor is None:  # a file system without direct I/O (tmpfs...)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                self._write_all(descriptor, self.size)
            except BaseException:
                os.close(descriptor)
                raise
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        self.clear()
        if self.bytes.size > self.KEEP:  # a prompt pass with attention captured: do not hold its size all run long
            self._map(self.capacity)
        if self._scratch.nbytes > self.KEEP:
            self._scratch = np.empty(0, dtype=np.uint32)

    def _write_direct(self, path: Path) -> int | None:
        """Writes the file bypassing the page cache; its open descriptor, or None where direct I/O is refused."""
        direct, size = getattr(os, "O_DIRECT", 0), self.size
        if not direct:
            return None
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | direct, 0o644)
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            return None
        try:
            self.reserve(_aligned(size))
            self.bytes[size : _aligned(size)] = 0
            self._write_all(descriptor, _aligned(size))
            os.ftruncate(descriptor, size)  # the padding that direct I/O needs goes
        except OSError as error:
            os.close(descriptor)
            if error.errno != errno.EINVAL:
                raise
            return None  # opened, but direct writes refused
        return descriptor

    def _write_all(self, descriptor: int, size: int) -> None:
        view = memoryview(self._memory)
        try:
            done = 0
            while done < size:
                done += os.pwrite(descriptor, view[done : min(size, done + self.CHUNK)], done)
        finally:
            view.release()

    def _map(self, capacity: int) -> None:
        self._memory = mmap.mmap(-1, capacity)
        self.bytes = np.frombuffer(self._memory, dtype=np.uint8)


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


_local = threading.local()


def _staging() -> StagedFile:
    """This thread's staging memory (each writer thread keeps its own, sized to the largest file it wrote)."""
    if not hasattr(_local, "staged"):
        _local.staged = StagedFile()
    return _local.staged
