"""The wire format: every message on the bus is a multipart ``[topic, header, payload]``.

* ``topic``: UTF-8 bytes; a prefix scheme so subscribers filter cheaply
  (``run.start``, ``tokens``, ``act.<capture name>``, ``result``, ``stats``,
  ``run.end``, and ``hello.<sink>`` subscriptions used to synchronise).
* ``header``: UTF-8 JSON object. Always ``v`` (format version), ``run``
  (run id), ``seq`` (0, 1, 2... per topic), ``kind``. Activation frames add
  ``step``, ``prompts``, ``positions``, ``name``, ``dtype``, ``shape``,
  ``codec`` and ``nbytes``.
* ``payload``: empty, JSON (``kind`` other than ``activation``), or the
  array's bytes (C order, little endian) encoded by ``codec``:
  ``raw``; ``lz4`` (lz4 block format with the 4-byte size prefix);
  ``lz4+shuffle`` (bytes regrouped by significance before lz4: byte j of
  every element, then byte j + 1...). bfloat16 travels as its 2-byte pattern.

The full schema is in docs/protocol.md; ``decode`` needs nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import lz4.block
import numpy as np

VERSION = 1
CODECS = ("raw", "lz4", "lz4+shuffle")
_NUMPY = {"float32": np.float32, "float64": np.float64, "int32": np.int32, "int64": np.int64, "uint32": np.uint32,
          "uint8": np.uint8, "bool": np.bool_, "float16": np.float16, "bfloat16": np.uint16, "int8": np.int8,
          "uint16": np.uint16, "int16": np.int16}


def activation_topic(name: str) -> str:
    return f"act.{name}"


@dataclass
class Frame:
    """A decoded message: its topic, header, and the array or JSON body."""

    topic: str
    header: dict[str, Any]
    body: Any


def shuffle(data, itemsize: int) -> bytes:
    """Byte j of every element, then byte j + 1...: ``data`` is any bytes-like object."""
    if itemsize == 1:
        return bytes(data)
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, itemsize).T.tobytes()


def unshuffle(data: bytes, itemsize: int) -> bytes:
    if itemsize == 1:
        return data
    return np.frombuffer(data, dtype=np.uint8).reshape(itemsize, -1).T.tobytes()


def encode_array(array: np.ndarray, dtype_name: str, codec: str) -> bytes | memoryview:
    """Payload bytes of ``array`` (already in its wire dtype) under ``codec``; ``raw`` shares the array's memory."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {CODECS}")
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    if codec == "raw":
        return data.data
    if codec == "lz4+shuffle":
        data = shuffle(data, array.dtype.itemsize)
    return lz4.block.compress(data, store_size=True)


def decode_array(payload: bytes, header: dict[str, Any], bfloat16_as: str = "float32") -> np.ndarray:
    """The array of an activation frame. bfloat16 becomes float32 (exact) or its raw uint16 patterns."""
    dtype = np.dtype(_NUMPY[header["dtype"]])
    codec = header["codec"]
    data = payload if codec == "raw" else lz4.block.decompress(payload)
    if codec == "lz4+shuffle":
        data = unshuffle(data, dtype.itemsize)
    array = np.frombuffer(data, dtype=dtype).reshape(header["shape"])
    if header["dtype"] == "bfloat16" and bfloat16_as == "float32":
        return bfloat16_to_float32(array)
    return array


def bfloat16_to_float32(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 values given as their uint16 patterns, widened to float32 (exact); into ``out`` (uint32 memory of
    the same shape) if given."""
    return np.left_shift(bits, 16, dtype=np.uint32, out=out).view(np.float32)  # one pass, no uint32 temporary


def message(topic: bytes | str, header: dict[str, Any], payload: bytes | Any = b"") -> list:
    """A multipart message; a bytes-like payload goes as it is (not copied), anything else as JSON."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        payload = json.dumps(payload).encode()
    topic = topic.encode() if isinstance(topic, str) else topic
    return [topic, json.dumps(header).encode(), payload]


def decode(parts: list[bytes], bfloat16_as: str = "float32") -> Frame:
    """Decodes a received multipart message (the payload may be any bytes-like object, read in place)."""
    topic, header, payload = parts[0].decode(), json.loads(parts[1]), parts[2]
    if header.get("kind") == "activation":
        body = decode_array(payload, header, bfloat16_as)
    else:
        body = json.loads(bytes(payload)) if len(payload) else None
    return Frame(topic, header, body)
