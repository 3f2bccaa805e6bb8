"""One npz file written by hand: what numpy and zipfile read, stored values aligned, direct I/O or not."""

import errno
import fcntl
import os
import zipfile

import numpy as np
import pytest

from gemmalens.sinks.npzfile import NPY_ALIGN, StagedFile, write_npz

ARRAYS = {
    "step": np.array(3),
    "prompts": np.arange(4, dtype=np.int64),
    "model.layers.0.resid_out": np.linspace(-2, 2, 4 * 3 * 5, dtype=np.float32).reshape(4, 3, 5),
    "model.layers.0.resid_out.positions": np.arange(12, dtype=np.int32).reshape(4, 3),
    "done": np.array([True, False, True, True]),
    "empty": np.zeros((0, 7), np.float16),
    "café": np.ones(3, np.int8),
}


@pytest.mark.parametrize("compress", [False, True], ids=["stored", "deflated"])
def test_numpy_and_zipfile_read_back_every_array_exactly(tmp_path, compress):
    write_npz(tmp_path / "a.npz", ARRAYS, compress)
    with zipfile.ZipFile(tmp_path / "a.npz") as archive:
        assert archive.testzip() is None  # every checksum right
        methods = {i.compress_type for i in archive.infolist()}
        assert methods == {zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED}
    with np.load(tmp_path / "a.npz") as data:
        assert data.files == list(ARRAYS)
        for name, array in ARRAYS.items():
            assert data[name].dtype == array.dtype and data[name].shape == array.shape
            assert data[name].tobytes() == array.tobytes()


def test_entries_hold_what_numpy_savez_writes_and_stored_values_start_aligned(tmp_path):
    write_npz(tmp_path / "ours.npz", ARRAYS, compress=False)
    np.savez(tmp_path / "numpy.npz", **ARRAYS)
    with zipfile.ZipFile(tmp_path / "ours.npz") as ours, zipfile.ZipFile(tmp_path / "numpy.npz") as theirs:
        for name in ARRAYS:
            assert ours.read(f"{name}.npy") == theirs.read(f"{name}.npy")  # npy header and values, byte for byte
            info = ours.getinfo(f"{name}.npy")
            with open(tmp_path / "ours.npz", "rb") as raw:
                raw.seek(info.header_offset + 26)
                name_length, extra_length = np.frombuffer(raw.read(4), np.uint16)
            npy_start = info.header_offset + 30 + name_length + extra_length
            assert npy_start % NPY_ALIGN == 0  # and npy headers are multiples of 64 long: values aligned too


def test_bfloat16_patterns_are_widened_to_their_exact_float32_values(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 2.0 ** -60, -0.0, 65280.0], np.float32).reshape(2, 3)  # exact in bf16
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    for compress in (False, True):
        write_npz(tmp_path / "b.npz", {"a": bits, "kept": bits}, compress, widen=frozenset({"a"}))
        with np.load(tmp_path / "b.npz") as data:
            assert data["a"].dtype == np.float32 and data["a"].tobytes() == values.tobytes()
            assert data["kept"].dtype == np.uint16


def test_a_file_larger_than_the_staging_memory_grows_it(tmp_path):
    big = np.arange(1 << 22, dtype=np.float32)  # 16 MiB, the initial capacity
    write_npz(tmp_path / "big.npz", {"big": big, "small": np.ones(3)}, compress=False)
    write_npz(tmp_path / "next.npz", {"small": np.zeros(2)}, compress=False)  # the same memory, a smaller file
    with np.load(tmp_path / "big.npz") as data:
        assert np.array_equal(data["big"], big)
    with np.load(tmp_path / "next.npz") as data:
        assert data.files == ["small"] and data["small"].tolist() == [0.0, 0.0]
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("direct", [True, False], ids=["direct-io", "page-cache"])
def test_staged_files_are_written_whole_at_their_size_from_reused_memory(tmp_path, monkeypatch, direct):
    if not direct:
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    staged = StagedFile(capacity=4096)
    first = np.arange(3000, dtype=np.uint32)
    staged.put(0, first)  # grows the memory
    staged.size = first.nbytes
    staged.write_to(tmp_path / "first")
    staged.put(0, b"\x00\xff\x02")  # the memory still holds the first file beyond these bytes
    staged.size = 3
    staged.write_to(tmp_path / "second")
    assert (tmp_path / "first").read_bytes() == first.tobytes()
    assert (tmp_path / "second").read_bytes() == b"\x00\xff\x02"


def test_a_file_system_that_refuses_direct_io_gets_the_file_through_the_page_cache(tmp_path, monkeypatch):
    real_pwrite, calls = os.pwrite, []

    def pwrite(descriptor, data, offset):
        calls.append(os.O_DIRECT & fcntl.fcntl(descriptor, fcntl.F_GETFL))
        if calls[-1]:
            raise OSError(errno.EINVAL, "direct I/O not supported")
        return real_pwrite(descriptor, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    staged = StagedFile()
    staged.put(0, b"values")
    staged.size = 6
    staged.write_to(tmp_path / "file")
    assert (tmp_path / "file").read_bytes() == b"values"
    assert calls[0] and not calls[-1]  # tried directly first, then written through the cache


def test_memory_grown_for_a_large_file_is_given_back_once_it_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(StagedFile, "KEEP", 1 << 16)
    staged = StagedFile(capacity=4096)
    staged.put(0, np.arange(1 << 16, dtype=np.uint32))  # 256 kB: grows past what is kept
    staged.size = 1 << 18
    staged.widened(np.zeros(1 << 15, np.uint16))  # 128 kB of widening scratch
    staged.write_to(tmp_path / "large")
    assert staged.bytes.size == 4096 and staged._scratch.nbytes == 0
    assert (tmp_path / "large").read_bytes() == np.arange(1 << 16, dtype=np.uint32).tobytes()
