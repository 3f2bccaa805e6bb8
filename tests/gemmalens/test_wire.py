"""The wire contract: frames round-trip bit for bit; every rule of docs/protocol.md refuses what breaks it."""

import json

import lz4.block
import numpy as np
import pytest

from gemmalens import wire
from gemmalens.errors import AddressError, WireError

DTYPES = ["float32", "float16", "int32", "int64", "uint32", "uint8", "int8", "bool", "float64"]


def activation(array, dtype=None, codec="raw", name="model.layers.0.resid_out", **changes):
    """An activation message as the publisher builds it, with header fields changed as asked."""
    dtype = dtype or str(array.dtype)
    rows = array.shape[0]
    head = wire.header("act." + name, "activation", "run1", "0", 0, batch=0, step=0, name=name, dtype=dtype,
                       shape=list(array.shape), axes=["batch", "seq"] + ["hidden"] * (array.ndim - 2), codec=codec,
                       nbytes=array.nbytes, slot=0)
    head.update(prompts=list(range(rows)), pads=[0] * rows, live=[True] * rows)
    head.update(changes)
    return [("act." + name).encode(), json.dumps(head).encode(), wire.encode_array(array, codec)]


@pytest.mark.parametrize("codec", wire.CODECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_arrays_round_trip_bit_for_bit(codec, dtype):
    array = (np.random.default_rng(0).standard_normal((3, 5, 7)) * 100).astype(dtype)
    frame = wire.decode(activation(array, codec=codec))
    assert frame.body.dtype == array.dtype and frame.body.tobytes() == array.tobytes()


@pytest.mark.parametrize("codec", wire.CODECS)
def test_zero_element_arrays_round_trip(codec):
    array = np.zeros((2, 0, 4), np.float32)
    assert wire.decode(activation(array, codec=codec)).body.shape == (2, 0, 4)


@pytest.mark.parametrize("codec", wire.CODECS)
def test_bfloat16_round_trips_exactly_as_float32_or_bit_patterns(codec):
    values = np.random.default_rng(1).standard_normal((4, 33)).astype(np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # truncated to bfloat16
    parts = activation(bits, dtype="bfloat16", codec=codec)
    assert np.array_equal(wire.decode(parts).body, (bits.astype(np.uint32) << 16).view(np.float32))
    assert wire.decode(parts, bfloat16_as="uint16").body.tobytes() == bits.tobytes()


def test_big_endian_arrays_go_out_little_endian():
    array = np.arange(6, dtype=">i4").reshape(2, 3)
    assert np.array_equal(wire.decode(activation(array, dtype="int32")).body, array.astype("<i4"))


def test_shuffle_groups_bytes_by_significance_and_inverts():
    data = np.arange(6, dtype=np.uint16).tobytes()
    assert wire.shuffle(data, 2) == bytes([0, 1, 2, 3, 4, 5, 0, 0, 0, 0, 0, 0])
    assert wire.unshuffle(wire.shuffle(data, 2), 2) == data


def test_positions_come_from_the_first_slot_and_the_pads():
    assert wire.positions_of(3, 3, [0, 2, 5]).tolist() == [[3, 4, 5], [1, 2, 3], [-1, -1, 0]]
    frame = wire.decode(activation(np.zeros((2, 3, 4), np.float32), slot=1, pads=[0, 2]))
    assert frame.positions().tolist() == [[1, 2, 3], [-1, 0, 1]]


def test_json_messages_carry_their_body():
    head = wire.header("batch.end", "batch_end", "run1", "0", 3)
    frame = wire.decode(wire.message("batch.end", head, {"batch": 0, "prompts": [0, 1], "steps": 4}))
    assert frame.topic == "batch.end" and frame.header["seq"] == 3 and frame.body["steps"] == 4


def test_rows_of_a_step_are_encoded_once():
    encoder, prompts, pads, live = wire.RowsEncoder(), [0, 1], [0, 1], [True, False]
    first = encoder.encode(prompts, pads, live)
    assert encoder.encode(prompts, pads, live) is first
    assert json.loads("{" + first + "}") == {"prompts": [0, 1], "pads": [0, 1], "live": [True, False]}


def good():
    return activation(np.ones((2, 3, 4), np.float32), codec="lz4")


def header_of(parts):
    return json.loads(parts[1])


def with_header(parts, **changes):
    head = header_of(parts)
    head.update(changes)
    return [parts[0], json.dumps(head).encode(), parts[2]]


HOSTILE = {
    "parts": lambda: good()[:2],
    "topic": lambda: [b"\xff\xfe", *good()[1:]],
    "header": lambda: [good()[0], b"{not json", good()[2]],
    "header as a list": lambda: [good()[0], b"[1, 2]", good()[2]],
    "old version": lambda: with_header(good(), v=1),
    "string seq": lambda: with_header(good(), seq="7"),
    "unknown topic": lambda: [b"nonsense", *good()[1:]],
    "kind": lambda: with_header(good(), kind="result"),
    "dtype": lambda: with_header(good(), dtype="object"),
    "codec": lambda: with_header(good(), codec="zstd"),
    "shape against nbytes": lambda: with_header(good(), shape=[2, 3, 5]),
    "axes": lambda: with_header(good(), axes=["batch", "seq"]),
    "rows": lambda: with_header(good(), prompts=[0]),
    "name into paths": lambda: [b"act.../../x", *with_header(good(), name="../../x")[1:]],
    "truncated lz4": lambda: [*good()[:2], bytes(good()[2])[:-5]],
    "2 GB size prefix": lambda: [*good()[:2], (2 << 30).to_bytes(4, "little") + bytes(good()[2])[4:]],
    "raw payload length": lambda: activation(np.ones((2, 3, 4), np.float32))[:2] + [b"short"],
    "run id": lambda: with_header(good(), run="../x"),
    "json body": lambda: [b"result", json.dumps(wire.header("result", "result", "r", "0", 0)).encode(), b"{"],
    "missing body field": lambda: [b"result", json.dumps(wire.header("result", "result", "r", "0", 0)).encode(),
                                   b'{"id": 1}'],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_messages_are_refused_with_the_rule_they_break(case):
    with pytest.raises(WireError):
        wire.decode(HOSTILE[case]())


def test_arrays_over_the_cap_are_refused_before_decompressing():
    big = np.zeros((4, 1000, 1000), np.float32)  # 16 MB, a few kB compressed
    parts = activation(big, codec="lz4")
    assert len(parts[2]) < 100_000
    with pytest.raises(WireError, match="cap"):
        wire.decode(parts, wire.Limits(array_bytes=1_000_000))


def test_a_size_prefix_that_lies_is_refused():
    parts = good()
    payload = bytes(parts[2])
    liar = (len(lz4.block.decompress(payload)) + 4).to_bytes(4, "little") + payload[4:]
    with pytest.raises(WireError, match="prefix"):
        wire.decode([*parts[:2], liar])


def test_upstream_messages_parse_or_are_named_invalid():
    assert wire.parse_upstream(b"\x01hello.npz.ab12") == ("subscribe", "hello.npz.ab12")
    assert wire.presence("hello.npz.ab12") == ("npz", "ab12")
    kind, body = wire.parse_upstream(wire.hello("npz", "ab12", {"have": [1]}))
    assert kind == "hello" and body["state"] == {"have": [1]}
    assert wire.parse_upstream(wire.alive("npz", "ab12"))[0] == "alive"
    assert wire.parse_upstream(wire.ack("npz", "ab12", "run1", True, "complete", {}, 0))[0] == "ack"
    for junk in (b"\xff", b"[]", b'{"v": 2, "kind": "hello", "sink": "../x", "instance": "1"}'):
        assert wire.parse_upstream(junk)[0] == "invalid"


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:5555", "tcp://[::1]:0", "tcp://host.example:*", "ipc:///tmp/x",
                                     "inproc://bus"])
def test_usable_addresses_pass(address):
    assert wire.check_address(address) == address


@pytest.mark.parametrize("address, says", [("localhost:5799", "tcp://localhost:5799"), ("tcp://localhost", "PORT"),
                                           ("tcp://h:70000", "outside"), ("udp://h:1", "unsupported"),
                                           ("ipc://", "needs a name")])
def test_unusable_addresses_say_what_to_write(address, says):
    with pytest.raises(AddressError, match=says):
        wire.check_address(address)


@pytest.mark.parametrize("address, local", [("ipc:///tmp/x", True), ("tcp://127.0.0.1:1", True),
                                            ("tcp://localhost:1", True), ("tcp://[::1]:1", True),
                                            ("tcp://0.0.0.0:1", False), ("tcp://*:1", False),
                                            ("tipc://{5560,0,0}", False), ("vmci://1:2", False)])
def test_only_known_local_transports_count_as_loopback(address, local):
    assert wire.is_loopback(address) is local


def sparse_message(array, nnz_delta=0, corrupt=None, codec="lz4"):
    """An SAE features frame as the engine sends it: the nonzeros of ``array`` [rows, seq, width]."""
    import json

    from gemmalens import wire

    sparse = wire.Sparse.of(array)
    if corrupt == "index":
        sparse.indices[0] = array.shape[-1]
    if corrupt == "counts":
        sparse.counts[0] += 1
        sparse.counts[1] -= 1 if sparse.counts[1] else -1
    payload = sparse.payload()
    topic = "act.sae.demo.features"
    head = wire.header(topic, "activation", "run1", "0", 0, batch=0, step=0, name="sae.demo.features",
                       dtype="float32", shape=list(array.shape), axes=["batch", "seq", "latents"], codec=codec,
                       nbytes=payload.nbytes, slot=0, layout="sparse", nnz=len(sparse.indices) + nnz_delta)
    head.update(prompts=list(range(array.shape[0])), pads=[0] * array.shape[0], live=[True] * array.shape[0])
    return [topic.encode(), json.dumps(head).encode(), wire.encode_array(payload, codec)]


def test_sparse_frames_decode_to_the_dense_array_or_stay_sparse():
    from gemmalens import wire

    rng = np.random.default_rng(0)
    array = np.where(rng.random((2, 3, 50)) < 0.1, rng.standard_normal((2, 3, 50)), 0).astype(np.float32)
    for codec in ("raw", "lz4"):
        assert np.array_equal(wire.decode(sparse_message(array, codec=codec)).body, array)
    kept = wire.decode(sparse_message(array), sparse="sparse").body
    assert kept.shape == (2, 3, 50) and len(kept.values) == int((array != 0).sum())
    assert np.array_equal(kept.dense(), array)


@pytest.mark.parametrize("damage, message", [({"nnz_delta": 1}, "nbytes"), ({"corrupt": "index"}, "sparse index"),
                                             ({"corrupt": "counts"}, "out of order")])
def test_a_malformed_sparse_frame_is_refused(damage, message):
    from gemmalens import wire

    array = np.zeros((2, 3, 50), np.float32)
    array[:, :, 7] = 1.0
    array[0, 0, 9] = 2.0
    with pytest.raises(WireError, match=message):
        wire.decode(sparse_message(array, **damage))
