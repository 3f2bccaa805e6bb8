"""Captured values off the device: one step's values packed into one buffer per dtype, one copy each.

On a CUDA GPU, MLX arrays live in managed memory: reading one from the host
(``np.array``) pages it over slowly and waits for the work queued on the
device behind it. The CUDA runtime copies the same memory into page-locked
memory an order of magnitude faster, on a stream of its own, alongside the next
step; the values are then read where they landed. Elsewhere (the CPU, Apple
silicon) the host reads the memory directly.
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading
import weakref
from collections import deque
from typing import Callable

import mlx.core as mx
import numpy as np

_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: direction from the pointers (unified addressing)
_STREAM_NON_BLOCKING = 1  # cudaStreamNonBlocking: no implicit ordering with MLX's streams


class CudaCopy:
    """Device-to-host copies through the CUDA runtime, one at a time, on a private non-blocking stream.

    The copies land in page-locked memory (much faster to copy into than
    ordinary memory). Each copy's block goes back to a pool
    when the last array viewing it is collected, so steady generation reuses
    the same blocks instead of faulting in fresh memory at every step.
    """

    KEEP = 1 << 30  # bytes of free blocks kept for reuse; beyond that, freed blocks go back to the system

    def __init__(self, runtime: ctypes.CDLL):
        self._rt = runtime
        runtime.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                            ctypes.c_void_p]
        runtime.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]
        runtime.cudaStreamCreateWithFlags.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
        runtime.cudaMallocHost.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        runtime.cudaFreeHost.argtypes = [ctypes.c_void_p]
        self._stream = ctypes.c_void_p()
        self._check(runtime.cudaStreamCreateWithFlags(ctypes.byref(self._stream), _STREAM_NON_BLOCKING), "stream")
        self._free: list[tuple[int, int]] = []  # (address, size) of page-locked blocks not in use
        self._returned: deque = deque()  # blocks whose arrays were collected (appended from any thread, by GC)
        self._lock = threading.Lock()

    def __call__(self, array: mx.array) -> np.ndarray:
        source = np.frombuffer(memoryview(array), dtype=np.uint8)  # the array's own memory, not a copy
        dtype = _numpy_dtype(array.dtype)
        if source.nbytes == 0:
            return np.empty(array.shape, dtype=dtype)
        with self._lock:
            block = self._block(source.nbytes)
            self._check(self._rt.cudaMemcpyAsync(ctypes.addressof(block), source.ctypes.data, source.nbytes,
                                                 _MEMCPY_DEFAULT, self._stream), "copy")
            self._check(self._rt.cudaStreamSynchronize(self._stream), "copy")
        return np.ctypeslib.as_array(block).view(dtype).reshape(array.shape)

    def _block(self, nbytes: int):
        """A page-locked block of at least ``nbytes``, as a ctypes array that returns it to the pool when collected."""
        while self._returned:
            self._free.append(self._returned.popleft())
        while sum(size for _, size in self._free) > self.KEEP:
            self._rt.cudaFreeHost(ctypes.c_void_p(self._free.pop(0)[0]))
        fits = [i for i, (_, size) in enumerate(self._free) if nbytes <= size <= 2 * nbytes]
        if fits:
            address, size = self._free.pop(fits[0])
        else:
            size = max(nbytes, 1 << 20)
            pointer = ctypes.c_void_p()
            self._check(self._rt.cudaMallocHost(ctypes.byref(pointer), size), f"page-locked allocation ({size} B)")
            address = pointer.value
        block = (ctypes.c_uint8 * nbytes).from_address(address)
        weakref.finalize(block, self._returned.append, (address, size))
        return block

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"CUDA {what} failed with error {status}")


def dtype_name(dtype: mx.Dtype) -> str:
    """An MLX dtype's plain name: ``float32``, ``bfloat16``..."""
    return str(dtype).rsplit(".", 1)[-1]


def _numpy_dtype(dtype: mx.Dtype) -> np.dtype:
    return np.dtype(dtype_name(dtype))


def _host_read(array: mx.array) -> np.ndarray:
    return np.array(array)


def host_copier() -> Callable[[mx.array], np.ndarray]:
    """The fastest device-to-host copy here: the CUDA runtime's when MLX runs on a CUDA GPU, else ``np.array``."""
    if mx.cuda.is_available() and mx.default_device() == mx.gpu:
        return _cuda_copy() or _host_read
    return _host_read


@functools.cache
def _cuda_copy() -> CudaCopy | None:
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            return CudaCopy(ctypes.CDLL(name))
        except (OSError, AttributeError):
            continue
    return None


class StepValues:
    """One step's captured values, packed on the device into one flat buffer per dtype.

    ``dtype`` converts floating values first (the wire dtype); bfloat16 travels
    as its 16-bit patterns. Once the buffers are evaluated (MLX evaluates on
    the thread that built them), ``fetch`` copies every buffer to the host on
    first use, from any thread, once, and returns views into the copies.
    """

    def __init__(self, values: dict[str, mx.array], copier: Callable[[mx.array], np.ndarray],
                 dtype: mx.Dtype | None = None):
        self._copier = copier
        self.layout: dict[str, tuple[str, int, tuple[int, ...]]] = {}  # name -> (wire dtype, start, shape)
        self._nbytes: dict[str, int] = {}
        groups: dict[str, list[mx.array]] = {}
        sizes: dict[str, int] = {}
        for name, value in values.items():
            if dtype is not None and mx.issubdtype(value.dtype, mx.floating):
                value = value.astype(dtype)
            label = dtype_name(value.dtype)
            flat = (value.view(mx.uint16) if value.dtype == mx.bfloat16 else value).reshape(-1)
            self.layout[name] = (label, sizes.get(label, 0), tuple(value.shape))
            self._nbytes[name] = value.nbytes
            sizes[label] = sizes.get(label, 0) + flat.size
            groups.setdefault(label, []).append(flat)
        self.buffers = {label: parts[0] if len(parts) == 1 else mx.concatenate(parts) for label, parts in groups.items()}
        self._host: dict[str, np.ndarray] | None = None
        self._lock = threading.Lock()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.layout[name][2]

    def nbytes(self, name: str) -> int:
        return self._nbytes[name]

    def fetch(self, name: str) -> tuple[np.ndarray, str]:
        """``name``'s value on the host and its wire dtype name."""
        if self._host is None:
            with self._lock:
                if self._host is None:  # the first caller copies, the others wait for it
                    self._host = {label: self._copier(buffer) for label, buffer in self.buffers.items()}
                    self.buffers = {}
        label, start, shape = self.layout[name]
        return self._host[label][start : start + math.prod(shape)].reshape(shape), label
