"""The bus contract, protocol version 2: every message, both ways, encoded, decoded and checked.

docs/protocol.md is the specification; this module is its one implementation, imported by the engine's
publisher, every sink and any custom subscriber. It imports neither MLX nor the engine.

Engine to subscribers: multipart ``[topic, header, payload]`` on an XPUB (reliable) or PUB (lossy) socket.
Subscribers to the engine (reliable ones, over XSUB): single-frame JSON messages, ``hello`` (who the
subscriber is and what it already holds) and ``ack`` (it has the run's end and everything before it on disk).

``decode`` trusts nothing: every field is checked (types, dtype list, shape against byte counts, caps on sizes,
names that go into file names); a message that breaks a rule raises ``WireError`` with the rule's name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import lz4.block
import numpy as np

from .errors import AddressError, WireError

VERSION = 2

RUN_START, TOKENS, RESULT, BATCH_END, STATS, RUN_END = "run.start", "tokens", "result", "batch.end", "stats", "run.end"
INTERVENTION = "intervention"
ACTIVATION = "act."  # topic prefix: act.<capture point>
HELLO = "hello."  # hello.<sink>.<instance>: a subscriber's presence (its subscription); the engine's welcome, receipt
CONTROL = (RUN_START, RUN_END, STATS, BATCH_END, INTERVENTION)  # every subscriber receives these
KINDS = {RUN_START: "run_start", TOKENS: "tokens", RESULT: "result", BATCH_END: "batch_end", STATS: "stats",
         RUN_END: "run_end", INTERVENTION: "intervention"}
SAMPLE_TEMPLATE = "generate.step_{k}.sample."  # sampling values: one name per step, e.g. generate.step_3.sample.token

CODECS = ("raw", "lz4", "lz4+shuffle")
DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": np.uint16,
          "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64, "uint8": np.uint8,
          "uint16": np.uint16, "uint32": np.uint32, "bool": np.bool_}
AXES = ("batch", "seq", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "keys", "vocab", "features",
        "latents", "top")

NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_{}]+)*$")  # capture names: they become npz entry names
SINK_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ENGINE_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Limits:
    """Caps on what a subscriber accepts: bytes of one message on the wire, of one decoded array, and of one
    step's arrays together. Larger messages are refused before they are decompressed."""

    message_bytes: int = 4 << 30
    array_bytes: int = 4 << 30
    step_bytes: int = 32 << 30


DEFAULT_LIMITS = Limits()


@dataclass
class Frame:
    """A decoded message: its topic, header, and body (a numpy array for activations, else the JSON body)."""

    topic: str
    header: dict[str, Any]
    body: Any

    def positions(self) -> np.ndarray:
        """``[rows, seq]`` int64: the sequence position of each entry along an activation's ``seq`` axis (-1 on
        left padding): entry i of row r sits at slot ``slot + i``, which is position ``slot + i - pads[r]``."""
        header = self.header
        seq = header["shape"][header["axes"].index("seq")]
        return positions_of(header["slot"], seq, header["pads"])


@dataclass
class Sparse:
    """An array ``shape`` (``[..., width]``) with few nonzeros along its last axis: for each leading entry in C
    order its count of nonzeros (``counts``), then every nonzero's index along the last axis (``indices``, in
    order) and value (``values``). SAE features travel and are stored this way (docs/protocol.md)."""

    shape: tuple[int, ...]
    counts: np.ndarray  # int32 [prod(shape[:-1])]
    indices: np.ndarray  # int32 [nnz]
    values: np.ndarray  # [nnz]

    @classmethod
    def of(cls, array: np.ndarray) -> "Sparse":
        flat = array.reshape(-1, array.shape[-1])
        rows, columns = np.nonzero(flat)
        return cls(tuple(array.shape), np.bincount(rows, minlength=flat.shape[0]).astype(np.int32),
                   columns.astype(np.int32), flat[rows, columns])

    def dense(self) -> np.ndarray:
        out = np.zeros((len(self.counts), self.shape[-1]), dtype=self.values.dtype)
        out[np.repeat(np.arange(len(self.counts)), self.counts), self.indices] = self.values
        return out.reshape(self.shape)

    def payload(self) -> np.ndarray:
        """The wire bytes (before the codec): counts, indices, values, little endian."""
        return np.concatenate([np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).reshape(-1).view(np.uint8)
                               for a in (self.counts, self.indices, self.values)])


def positions_of(slot: int, length: int, pads: list[int]) -> np.ndarray:
    """Positions ``[rows, length]`` of the slots ``slot..slot + length - 1`` in rows with these leading pads."""
    positions = slot + np.arange(length, dtype=np.int64)[None, :] - np.asarray(pads, dtype=np.int64)[:, None]
    return np.where(positions >= 0, positions, -1)


def activation_topic(name: str) -> str:
    return ACTIVATION + name


# engine side: encoding -------------------------------------------------------------------------------------


def shuffle(data, itemsize: int) -> bytes:
    """Byte j of every element, then byte j + 1...: ``data`` is any bytes-like object."""
    if itemsize == 1:
        return bytes(data)
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, itemsize).T.tobytes()


def unshuffle(data: bytes, itemsize: int) -> bytes:
    if itemsize == 1:
        return bytes(data)
    return np.frombuffer(data, dtype=np.uint8).reshape(itemsize, -1).T.tobytes()


def encode_array(array: np.ndarray, codec: str) -> bytes | memoryview:
    """Payload bytes of ``array`` (already in its wire dtype; bfloat16 as uint16 patterns) under ``codec``: its
    bytes in C order, little endian; ``raw`` shares the array's memory."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {CODECS}")
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    data = array.reshape(-1).view(np.uint8)
    if codec == "raw":
        return data.data
    if codec == "lz4+shuffle":
        data = shuffle(data, array.dtype.itemsize)
    return lz4.block.compress(data, store_size=True)


def header(topic: str, kind: str, run: str, engine: str, seq: int, **fields) -> dict[str, Any]:
    """A header: the fields every message has, then the kind's own."""
    return {"v": VERSION, "run": run, "engine": engine, "seq": seq, "kind": kind, **fields}


def message(topic: str, head: dict[str, Any], body: Any = None) -> list:
    """A multipart message; a bytes-like body goes as it is (not copied), anything else as JSON (None: empty)."""
    if body is None:
        payload = b""
    elif isinstance(body, (bytes, bytearray, memoryview)):
        payload = body
    else:
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
    return [topic.encode("utf-8"), json.dumps(head).encode("utf-8"), payload]


class RowsEncoder:
    """The per-row members of activation headers (``prompts``, ``pads``, ``live``) as JSON, encoded once for
    every frame of a step that shares the same lists (a step's frames do: the engine builds them once)."""

    def __init__(self):
        self._last: tuple = ((None, None, None), "")

    def encode(self, prompts: list[int], pads: list[int], live: list[bool]) -> str:
        lists, cached = (prompts, pads, live), self._last  # read once: several threads call this
        if all(a is b for a, b in zip(lists, cached[0])):
            return cached[1]
        text = json.dumps({"prompts": prompts, "pads": pads, "live": live})[1:-1]
        self._last = (lists, text)  # the lists are kept with their text, so their ids cannot be reused meanwhile
        return text


def activation_header(head: dict[str, Any], rows_json: str) -> bytes:
    """An activation header: ``head`` (every other field) and the rows' members from ``RowsEncoder``."""
    text = json.dumps(head)
    return f"{text[:-1]}, {rows_json}}}".encode("utf-8")


# subscriber side: decoding and checking --------------------------------------------------------------------


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ints(value) -> bool:
    return isinstance(value, list) and all(_int(v) for v in value)


def _str(value) -> bool:
    return isinstance(value, str)


def _optional(check: Callable) -> Callable:
    return lambda value: value is None or check(value)


# Required fields of each kind's JSON body and their types; unknown fields are ignored (forward compatible).
BODY = {
    "run_start": {"run": _str, "spec": lambda v: isinstance(v, dict), "prompts": lambda v: isinstance(v, list),
                  "capture": lambda v: isinstance(v, dict), "engines": _int, "segment": lambda v: isinstance(v, dict)},
    "tokens": {"batch": _int, "step": _int, "prompts": _ints, "tokens": _ints, "positions": _ints, "frames": _int},
    "result": {"id": _int, "prompt": _str, "tokens": _ints, "text": _str, "finish_reason": _str},
    "batch_end": {"batch": _int, "prompts": _ints, "steps": _int},
    "intervention": {"batch": _int, "step": _int,
                     "interventions": lambda v: isinstance(v, list) and all(
                         isinstance(x, dict) and _str(x.get("id")) and _ints(x.get("rows")) for x in v)},
    "stats": {},
    "run_end": {"complete": lambda v: isinstance(v, bool), "reason": _optional(_str),
                "topics": lambda v: isinstance(v, dict) and all(_str(k) and _int(n) for k, n in v.items())},
    "welcome": {},
    "receipt": {"run": _str},
}
ACTIVATION_FIELDS = {"batch": _int, "step": _int, "name": _str, "dtype": _str, "shape": _ints,
                     "axes": lambda v: isinstance(v, list) and all(a in AXES for a in v), "codec": _str,
                     "nbytes": _int, "slot": _int, "prompts": _ints, "pads": _ints,
                     "live": lambda v: isinstance(v, list) and all(isinstance(x, bool) for x in v)}


def _check_fields(where: str, body: Any, fields: dict[str, Callable]) -> None:
    if not isinstance(body, dict):
        raise WireError("body", f"{where}: expected a JSON object, got {type(body).__name__}")
    for name, check in fields.items():
        if name not in body:
            raise WireError("field", f"{where}: no {name!r}")
        if not check(body[name]):
            raise WireError("field", f"{where}: {name!r} has the wrong type ({json.dumps(body[name])[:80]})")


def decode_header(parts: list) -> tuple[str, dict[str, Any]]:
    """Topic and header of a received message, checked (the payload is left alone)."""
    if len(parts) != 3:
        raise WireError("parts", f"expected 3 frames (topic, header, payload), got {len(parts)}")
    try:
        topic = bytes(parts[0]).decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("topic", f"topic is not UTF-8 ({bytes(parts[0])[:40]!r})") from None
    try:
        head = json.loads(bytes(parts[1]))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WireError("header", f"{topic}: header is not JSON ({error})") from None
    if not isinstance(head, dict):
        raise WireError("header", f"{topic}: header is a {type(head).__name__}, not an object")
    if head.get("v") != VERSION:
        raise WireError("version", f"{topic}: protocol version {head.get('v')!r}, this subscriber reads {VERSION}")
    for name, pattern in (("run", RUN_ID), ("engine", ENGINE_ID)):
        if not isinstance(head.get(name), str) or not pattern.match(head[name]):
            raise WireError("header", f"{topic}: {name} {json.dumps(head.get(name))[:40]} is not a valid id")
    if not _int(head.get("seq")) or head["seq"] < 0:
        raise WireError("header", f"{topic}: seq {json.dumps(head.get('seq'))[:40]} is not a count")
    kind = head.get("kind")
    expected = ("activation",) if topic.startswith(ACTIVATION) else ("welcome", "receipt") if topic.startswith(
        HELLO) else (KINDS[topic],) if topic in KINDS else None
    if expected is None:
        raise WireError("topic", f"unknown topic {topic[:80]!r}")
    if kind not in expected:
        raise WireError("header", f"{topic}: kind {kind!r}, expected {' or '.join(map(repr, expected))}")
    return topic, head


def decode(parts: list, limits: Limits = DEFAULT_LIMITS, bfloat16_as: str = "float32", sparse: str = "dense") -> Frame:
    """Decodes and checks one received message (the payload may be any bytes-like object, read in place).

    bfloat16 arrays become float32 (exact) or, with ``bfloat16_as="uint16"``, stay their 16-bit patterns. Sparse
    frames (SAE features) become dense arrays, or with ``sparse="sparse"`` stay ``Sparse``."""
    size = sum(len(memoryview(p)) for p in parts)
    if size > limits.message_bytes:
        raise WireError("size", f"a message of {size} bytes exceeds the cap of {limits.message_bytes}")
    topic, head = decode_header(parts)
    if head["kind"] != "activation":
        payload = bytes(parts[2])
        try:
            body = json.loads(payload) if payload else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise WireError("body", f"{topic}: payload is not JSON ({error})") from None
        _check_fields(topic, body, BODY[head["kind"]])
        return Frame(topic, head, body)
    return Frame(topic, head, decode_array(topic, head, parts[2], limits, bfloat16_as, sparse))


def check_activation(topic: str, head: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> np.dtype:
    """Checks an activation header against itself and the caps; returns the payload's numpy dtype."""
    _check_fields(topic, head, ACTIVATION_FIELDS)
    name = head["name"]
    if not NAME.match(name) or topic != ACTIVATION + name:
        raise WireError("name", f"{topic[:80]}: name {name[:80]!r} is not a capture name (or not its topic's)")
    if head["dtype"] not in DTYPES:
        raise WireError("dtype", f"{topic}: dtype {head['dtype'][:40]!r} is not one of {', '.join(DTYPES)}")
    if head["codec"] not in CODECS:
        raise WireError("codec", f"{topic}: codec {head['codec'][:40]!r} is not one of {', '.join(CODECS)}")
    shape, axes = head["shape"], head["axes"]
    if len(shape) != len(axes) or any(n < 0 for n in shape) or not axes or axes[0] != "batch" or "seq" not in axes:
        raise WireError("shape", f"{topic}: shape {shape} does not fit axes {axes}")
    dtype = np.dtype(DTYPES[head["dtype"]])
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > limits.array_bytes:
        raise WireError("size", f"{topic}: an array of {nbytes} bytes exceeds the cap of {limits.array_bytes}")
    layout = head.get("layout", "dense")
    if layout == "sparse":
        nnz = head.get("nnz")
        if not _int(nnz) or not 0 <= nnz <= math.prod(shape) or len(shape) < 2:
            raise WireError("field", f"{topic}: a sparse frame needs 'nnz' between 0 and its size, got "
                                     f"{json.dumps(nnz)[:40]}")
        nbytes = 4 * math.prod(shape[:-1]) + (4 + dtype.itemsize) * nnz
    elif layout != "dense":
        raise WireError("field", f"{topic}: layout {json.dumps(layout)[:40]} is not dense or sparse")
    if head["nbytes"] != nbytes:
        raise WireError("shape", f"{topic}: nbytes {head['nbytes']} but shape {shape} of {head['dtype']} holds {nbytes}"
                        + (f" as {layout}" if layout != "dense" else ""))
    rows = shape[0]
    if not (len(head["prompts"]) == len(head["pads"]) == len(head["live"]) == rows):
        raise WireError("rows", f"{topic}: {rows} rows but {len(head['prompts'])} prompts, {len(head['pads'])} pads, "
                                f"{len(head['live'])} live flags")
    if head["step"] < 0 or head["slot"] < 0 or any(p < 0 for p in head["pads"]):
        raise WireError("field", f"{topic}: negative step, slot or pad")
    return dtype


def decode_array(topic: str, head: dict[str, Any], payload, limits: Limits = DEFAULT_LIMITS,
                 bfloat16_as: str = "float32", sparse: str = "dense") -> np.ndarray | Sparse:
    dtype = check_activation(topic, head, limits)
    nbytes, codec = head["nbytes"], head["codec"]
    view = memoryview(payload)
    if codec == "raw":
        if len(view) != nbytes:
            raise WireError("payload", f"{topic}: {len(view)} payload bytes, header says {nbytes}")
        data = view
    else:
        if len(view) < 4 or int.from_bytes(view[:4], "little") != nbytes:
            raise WireError("payload", f"{topic}: lz4 size prefix does not match nbytes {nbytes}")
        try:
            data = lz4.block.decompress(view) if nbytes else b""
        except (lz4.block.LZ4BlockError, ValueError) as error:
            raise WireError("payload", f"{topic}: lz4 payload does not decompress ({error})") from None
        if len(data) != nbytes:
            raise WireError("payload", f"{topic}: decompressed to {len(data)} bytes, header says {nbytes}")
        if codec == "lz4+shuffle":
            data = unshuffle(data, dtype.itemsize)
    if head.get("layout") == "sparse":
        return _sparse(topic, head, data, dtype, bfloat16_as, sparse)
    array = np.frombuffer(data, dtype=dtype.newbyteorder("<")).reshape(head["shape"])
    if head["dtype"] == "bfloat16" and bfloat16_as == "float32":
        return bfloat16_to_float32(array)
    return array


def _sparse(topic: str, head: dict[str, Any], data, dtype: np.dtype, bfloat16_as: str, sparse: str):
    shape, nnz = tuple(head["shape"]), head["nnz"]
    leading = math.prod(shape[:-1])
    counts = np.frombuffer(data, dtype="<i4", count=leading)
    indices = np.frombuffer(data, dtype="<i4", count=nnz, offset=4 * leading)
    values = np.frombuffer(data, dtype=dtype.newbyteorder("<"), count=nnz, offset=4 * (leading + nnz))
    if counts.min(initial=0) < 0 or int(counts.sum(dtype=np.int64)) != nnz or counts.max(initial=0) > shape[-1]:
        raise WireError("payload", f"{topic}: sparse counts do not add up to nnz {nnz} within width {shape[-1]}")
    if nnz and (indices.min() < 0 or indices.max() >= shape[-1]):
        raise WireError("payload", f"{topic}: a sparse index outside 0-{shape[-1] - 1}")
    rising = np.diff(indices) > 0  # within each entry's span the indices rise; between spans they may not
    ends = np.cumsum(counts, dtype=np.int64)[:-1]
    rising[ends[(ends > 0) & (ends < nnz)] - 1] = True
    if not rising.all():
        raise WireError("payload", f"{topic}: sparse indices out of order: the counts do not add up per entry")
    if head["dtype"] == "bfloat16" and bfloat16_as == "float32":
        values = bfloat16_to_float32(values)
    out = Sparse(shape, counts, indices, values)
    return out if sparse == "sparse" else out.dense()


def bfloat16_to_float32(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 values given as their uint16 patterns, widened to float32 (exact); into ``out`` (uint32 memory of
    the same shape) if given."""
    return np.left_shift(bits, 16, dtype=np.uint32, out=out).view(np.float32)  # one pass, no uint32 temporary


# subscribers to the engine: hello and ack ------------------------------------------------------------------


def hello(sink: str, instance: str, state: dict[str, Any] | None = None) -> bytes:
    """A subscriber's introduction, sent in answer to the engine's welcome: its name and what it already holds
    (``state``: ``folder``, ``run``, ``complete``, ``have`` (prompt ids done), ``spec``)."""
    return json.dumps({"v": VERSION, "kind": "hello", "sink": sink, "instance": instance,
                       "state": state or {}}).encode("utf-8")


def ack(sink: str, instance: str, run: str, complete: bool, detail: str, received: dict[str, dict[str, int]],
        rejected: int) -> bytes:
    """A subscriber's answer to ``run.end``: everything it received is durable (or not, and why)."""
    return json.dumps({"v": VERSION, "kind": "ack", "sink": sink, "instance": instance, "run": run,
                       "complete": complete, "detail": detail, "received": received,
                       "rejected": rejected}).encode("utf-8")


def alive(sink: str, instance: str) -> bytes:
    """A reliable subscriber's sign of life, every second: the engine knows it is not stopped or hung."""
    return json.dumps({"v": VERSION, "kind": "alive", "sink": sink, "instance": instance}).encode("utf-8")


def presence_topic(sink: str, instance: str) -> str:
    return f"{HELLO}{sink}.{instance}"


def parse_upstream(data: bytes) -> tuple[str, Any]:
    """What an engine's reliable socket read from a subscriber: ``("subscribe"|"unsubscribe", topic)``,
    ``("hello"|"alive"|"ack", body)``, or ``("invalid", reason)``."""
    if data[:1] in (b"\x00", b"\x01"):
        try:
            topic = data[1:].decode("utf-8")
        except UnicodeDecodeError:
            return "invalid", "a subscription that is not UTF-8"
        return ("subscribe" if data[:1] == b"\x01" else "unsubscribe"), topic
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "invalid", f"not JSON: {data[:40]!r}"
    if not isinstance(body, dict) or body.get("v") != VERSION or body.get("kind") not in ("hello", "alive", "ack"):
        return "invalid", f"not a hello, alive or ack of protocol {VERSION}: {data[:80]!r}"
    if not isinstance(body.get("sink"), str) or not SINK_NAME.match(body["sink"]) or not isinstance(
            body.get("instance"), str):
        return "invalid", f"no valid sink name: {data[:80]!r}"
    return body["kind"], body


def presence(topic: str) -> tuple[str, str] | None:
    """``(sink, instance)`` of a presence topic ``hello.<sink>.<instance>``, or None."""
    if not topic.startswith(HELLO):
        return None
    sink, _, instance = topic[len(HELLO):].partition(".")
    return (sink, instance) if SINK_NAME.match(sink) and instance else None


# addresses ---------------------------------------------------------------------------------------------------

_TCP = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[^:/\[\]]+):(\*|\d{1,5})$")


def check_address(address: str, option: str = "address") -> str:
    """``address`` if it is a ZeroMQ endpoint gemmalens can use (``tcp://HOST:PORT``, ``ipc://PATH``,
    ``inproc://NAME``); otherwise an ``AddressError`` saying what is wrong and what to write instead."""
    text = address.strip()
    scheme, found, rest = text.partition("://")
    if not found:
        hint = f"tcp://{text}" if re.fullmatch(r"[^:/]+:\d+", text) else "tcp://127.0.0.1:5555"
        raise AddressError(f"{option} {address!r}: no transport; write it as {hint} (or ipc://PATH on one machine)")
    if scheme == "tcp":
        match = _TCP.match(text)
        if not match:
            raise AddressError(f"{option} {address!r}: expected tcp://HOST:PORT, e.g. tcp://127.0.0.1:5555")
        port = match.group(2)
        if port != "*" and not 0 <= int(port) <= 65535:
            raise AddressError(f"{option} {address!r}: port {port} is outside 0-65535")
        return text
    if scheme in ("ipc", "inproc"):
        if not rest:
            raise AddressError(f"{option} {address!r}: {scheme}:// needs a name, e.g. {scheme}:///tmp/gemmalens.bus")
        return text
    raise AddressError(f"{option} {address!r}: unsupported transport {scheme!r}; use tcp://, ipc:// or inproc://")


def is_loopback(address: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback host; False for any other transport or host."""
    import ipaddress

    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = re.sub(r":[^:]*$", "", rest).strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name or a host name: beyond loopback
