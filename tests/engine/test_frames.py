"""Frames round-trip bit for bit for every dtype and codec."""

import mlx.core as mx
import numpy as np
import pytest

from gemmalens.engine.frames import CODECS, decode, encode_array, message, shuffle, unshuffle
from gemmalens.engine.transfer import StepValues, host_copier

DTYPES = ["float32", "float16", "int32", "int64", "uint32", "uint8", "int8", "bool", "float64"]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_arrays_round_trip_bit_for_bit(codec, dtype):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 5, 7)) * 100).astype(dtype)
    header = {"kind": "activation", "dtype": dtype, "shape": list(array.shape), "codec": codec, "seq": 0}
    frame = decode(message("act.x", header, encode_array(array, dtype, codec)))
    assert frame.body.dtype == array.dtype and frame.body.tobytes() == array.tobytes()


@pytest.mark.parametrize("codec", CODECS)
def test_bfloat16_round_trips_exactly_as_float32_or_bit_patterns(codec):
    values = mx.random.normal((4, 33)).astype(mx.bfloat16)
    wire, dtype = StepValues({"x": values}, host_copier()).fetch("x")
    header = {"kind": "activation", "dtype": dtype, "shape": list(wire.shape), "codec": codec}
    parts = message("act.x", header, encode_array(wire, dtype, codec))
    assert dtype == "bfloat16"
    assert np.array_equal(decode(parts).body, np.array(values.astype(mx.float32)))
    assert decode(parts, bfloat16_as="uint16").body.tobytes() == np.array(values.view(mx.uint16)).tobytes()


def test_shuffle_groups_bytes_by_significance_and_inverts():
    data = np.arange(6, dtype=np.uint16).tobytes()
    assert shuffle(data, 2) == bytes([0, 1, 2, 3, 4, 5, 0, 0, 0, 0, 0, 0])
    assert unshuffle(shuffle(data, 2), 2) == data


def test_json_messages_carry_their_body():
    frame = decode(message("result", {"kind": "result", "seq": 3}, {"index": 1, "text": "hi"}))
    assert frame.topic == "result" and frame.header["seq"] == 3 and frame.body == {"index": 1, "text": "hi"}
