"""The npz archiver: files readable with plain numpy, incomplete batches left out of the index."""

import threading
import time
import zipfile

import numpy as np
import pytest
from helpers import tiny_generator

import gemmalens
from gemmalens.engine.frames import message
from gemmalens.sinks.npz import INDEX, NpzArchiver


def test_files_say_which_prompts_positions_and_tokens_their_rows_are(tmp_path):
    model, tokenizer = tiny_generator()
    results = gemmalens.batch_generate(model, tokenizer, ["one two three four", "five"], max_tokens=3, temperature=0,
                                       save_activations_dir=tmp_path, capture=["model.layers.0.resid_out"])
    with np.load(tmp_path / "activations_step_0_batch_0.npz") as step0:
        assert step0["prompts"].tolist() == [0, 1]
        assert step0["tokens"].tolist() == [r.tokens[0] for r in results]
        pad = step0["pad"].tolist()
        assert pad[0] == 0 and pad[1] == len(results[0].prompt_tokens) - len(results[1].prompt_tokens)
        positions = step0["model.layers.0.resid_out.positions"]
        assert positions[1].tolist() == [-1] * pad[1] + list(range(len(results[1].prompt_tokens)))
    with np.load(tmp_path / "activations_step_2_batch_0.npz") as step2:
        assert step2["model.layers.0.resid_out"].shape == (2, 1, 64)
        assert step2["model.layers.0.resid_out.positions"][:, 0].tolist() == [len(r.prompt_tokens) + 1 for r in results]


def activation(batch, step, name, seq, array=None, dtype="float32"):
    """One row's activation frame (prompt ``batch``), by default a single float32 zero."""
    array = np.zeros((1, 1), np.float32) if array is None else array
    header = {"kind": "activation", "seq": seq, "batch": batch, "step": step, "name": name, "prompts": [batch],
              "positions": [list(range(array.shape[1]))], "pads": [0], "dtype": dtype, "shape": list(array.shape),
              "codec": "raw"}
    return message(f"act.{name}", header, array.tobytes())


def test_a_batch_with_a_lost_frame_is_not_indexed(tmp_path):
    sink = NpzArchiver("inproc://unused-npz", tmp_path)
    info = {"capture": {"names": ["a", "b"], "sample_patterns": [], "exclude": [], "positions": "all"}, "prompts": []}
    sink.handle(message("run.start", {"kind": "run_start", "seq": 0}, info))
    sink.handle(activation(0, 0, "a", 0))  # "b" of step 0 never arrives
    sink.handle(message("tokens", {"kind": "tokens", "seq": 0}, {"batch": 0, "step": 0, "prompts": [0], "tokens": [5]}))
    sink.handle(message("batch.end", {"kind": "batch_end", "seq": 0}, {"batch": 0, "prompts": [0], "steps": 1}))
    sink.handle(message("run.end", {"kind": "run_end", "seq": 0}, {"complete": True, "topics": {}}))
    sink.close()
    assert (tmp_path / "activations_step_0_batch_0.npz").exists()
    assert gemmalens.open_activations(tmp_path).prompts == []
    assert (tmp_path / INDEX).exists()


def test_frames_of_one_step_keep_their_own_positions(tmp_path):
    sink = NpzArchiver("inproc://unused-npz", tmp_path)
    info = {"capture": {"names": ["a", "b", "c"], "sample_patterns": [], "exclude": [], "positions": "all"},
            "prompts": []}
    sink.handle(message("run.start", {"kind": "run_start", "seq": 0}, info))
    for seq, (name, width) in enumerate([("a", 3), ("b", 1), ("c", 3)]):  # b's positions differ from a's and c's
        sink.handle(activation(0, 0, name, seq, np.zeros((1, width), np.float32)))
    sink.handle(message("tokens", {"kind": "tokens", "seq": 0}, {"batch": 0, "step": 0, "prompts": [0], "tokens": [5]}))
    sink.handle(message("batch.end", {"kind": "batch_end", "seq": 0}, {"batch": 0, "prompts": [0], "steps": 1}))
    sink.handle(message("run.end", {"kind": "run_end", "seq": 0}, {"complete": True, "topics": {}}))
    sink.close()
    with np.load(tmp_path / "activations_step_0_batch_0.npz") as step0:
        assert [step0[f"{name}.positions"].tolist() for name in "abc"] == [[[0, 1, 2]], [[0]], [[0, 1, 2]]]


RUN_START = {"capture": {"names": ["a"], "sample_patterns": [], "exclude": [], "positions": "all"}, "prompts": []}


def finished_batch(sink, batch, array, dtype="float32", seq=0, steps=1):
    """Batch ``batch`` (one prompt, also numbered ``batch``) sends ``array`` as "a" at each of ``steps`` steps."""
    for step in range(steps):
        sink.handle(activation(batch, step, "a", seq + step, array, dtype))
        sink.handle(message("tokens", {"kind": "tokens", "seq": seq + step},
                            {"batch": batch, "step": step, "prompts": [batch], "tokens": [7]}))
    sink.handle(message("batch.end", {"kind": "batch_end", "seq": seq},
                        {"batch": batch, "prompts": [batch], "steps": steps}))


def test_bfloat16_frames_are_stored_as_the_exact_float32_values(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 2.0 ** -60, -0.0, 65280.0], np.float32).reshape(1, 2, 3)  # all exact in bf16
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    sink = NpzArchiver("inproc://unused-npz", tmp_path, compress=True, writers=2)
    sink.handle(message("run.start", {"kind": "run_start", "seq": 0}, RUN_START))
    finished_batch(sink, 0, bits, dtype="bfloat16")
    sink.handle(message("run.end", {"kind": "run_end", "seq": 0}, {"complete": True, "topics": {}}))
    sink.close()
    step0 = tmp_path / "activations_step_0_batch_0.npz"
    assert all(entry.compress_type == zipfile.ZIP_DEFLATED for entry in zipfile.ZipFile(step0).infolist())
    with np.load(step0) as data:
        assert data["a"].dtype == np.float32 and data["a"].tobytes() == values.tobytes()
    assert gemmalens.open_activations(tmp_path).prompts == [0]


def test_the_receiver_waits_once_the_writers_are_a_backlog_behind(tmp_path, monkeypatch):
    import gemmalens.sinks.npzsteps as npzsteps

    release = threading.Event()

    def stalled_write(*args):
        release.wait(10)
        write_npz(*args)

    write_npz = npzsteps.write_npz
    monkeypatch.setattr(npzsteps, "write_npz", stalled_write)
    sink = NpzArchiver("inproc://unused-npz", tmp_path, writers=1)  # backlog: 2 steps
    sink.handle(message("run.start", {"kind": "run_start", "seq": 0}, RUN_START))
    receiving = threading.Thread(target=finished_batch, args=(sink, 0, np.ones((1, 2, 3), np.float32)),
                                 kwargs={"steps": 4})
    receiving.start()
    time.sleep(0.5)
    handed_over = sink.open[0]["sent"]
    release.set()
    receiving.join(10)
    assert handed_over == sink.files.backlog + 1  # two steps waiting, the third's hand-over waits for the first
    sink.handle(message("run.end", {"kind": "run_end", "seq": 0}, {"complete": True, "topics": {}}))
    sink.close()
    assert len(gemmalens.open_activations(tmp_path).get("a")[0]) == 4


def test_a_failed_write_stops_the_sink_and_keeps_the_batches_already_indexed(tmp_path):
    sink = NpzArchiver("inproc://unused-npz", tmp_path, writers=2)
    sink.handle(message("run.start", {"kind": "run_start", "seq": 0}, RUN_START))
    finished_batch(sink, 0, np.ones((1, 2, 3), np.float32))
    (tmp_path / ".activations_step_0_batch_1.npz.partial").mkdir()  # batch 1's file cannot be created
    with pytest.raises(IsADirectoryError):  # raised as soon as the archiver learns of it, at the latest at run.end
        finished_batch(sink, 1, np.ones((1, 2, 3), np.float32), seq=1)
        sink.handle(message("run.end", {"kind": "run_end", "seq": 0}, {"complete": True, "topics": {}}))
    sink.abort("sink failed")
    activations = gemmalens.open_activations(tmp_path)
    assert activations.prompts == [0]
    assert activations.get("a")[0][0][1].tolist() == [[1.0] * 3] * 2


@pytest.mark.parametrize("positions, steps", [("generated", [1, 2]), ("prompt", [0])])
def test_a_run_capturing_some_steps_only_is_indexed_and_read_back(tmp_path, positions, steps):
    model, tokenizer = tiny_generator()
    results = gemmalens.batch_generate(model, tokenizer, ["one two three four", "five"], max_tokens=3, temperature=0,
                                       save_activations_dir=tmp_path, capture=["model.layers.0.resid_out"],
                                       positions=positions)
    activations = gemmalens.open_activations(tmp_path)
    assert activations.prompts == [0, 1] and activations.tokens == {r.index: r.tokens for r in results}
    assert sorted(activations.get("model.layers.0.resid_out")[1]) == steps
