"""A step's captured values, packed per dtype on the device, come back to the host exactly."""

import threading

import mlx.core as mx
import numpy as np

from gemmalens.engine.transfer import StepValues, host_copier


def step_values(dtype=None):
    values = {
        "a": mx.random.normal((2, 3, 5)).astype(mx.bfloat16),
        "b": mx.random.normal((2, 1, 7)),
        "c": mx.arange(12, dtype=mx.int32).reshape(2, 6),
        "d": mx.random.normal((2, 4)).astype(mx.bfloat16),
        "e": mx.array([[True, False], [False, True]]),
    }
    return values, StepValues(values, host_copier(), dtype)


def test_every_value_comes_back_bit_for_bit_in_one_buffer_per_dtype():
    values, packed = step_values()
    assert sorted(packed.buffers) == ["bfloat16", "bool", "float32", "int32"]
    for name, value in values.items():
        host, dtype = packed.fetch(name)
        assert host.shape == tuple(value.shape)
        if value.dtype == mx.bfloat16:
            assert dtype == "bfloat16" and host.tobytes() == np.array(value.view(mx.uint16)).tobytes()
        else:
            assert dtype == str(host.dtype) and np.array_equal(host, np.array(value))


def test_capture_dtype_converts_floating_values_only():
    values, packed = step_values(mx.bfloat16)
    host, dtype = packed.fetch("b")
    assert dtype == "bfloat16" and host.nbytes == np.array(values["b"]).nbytes // 2
    assert host.tobytes() == np.array(values["b"].astype(mx.bfloat16).view(mx.uint16)).tobytes()
    assert packed.fetch("c")[1] == "int32"
    full, dtype = StepValues({"a": values["a"]}, host_copier(), mx.float32).fetch("a")
    assert dtype == "float32" and np.array_equal(full, np.array(values["a"].astype(mx.float32)))


def test_threads_fetching_at_once_copy_once_and_agree():
    values, packed = step_values()
    copies = []
    packed._copier = lambda buffer, copy=packed._copier: copies.append(1) or copy(buffer)
    mx.eval(list(packed.buffers.values()))  # as the engine does before handing the step to the publisher
    results = {}
    threads = [threading.Thread(target=lambda n=n: results.setdefault(n, packed.fetch(n)[0])) for n in values]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(copies) == 4  # one copy per dtype, however many threads asked
    assert all(np.array_equal(results[n], packed.fetch(n)[0]) for n in values)
