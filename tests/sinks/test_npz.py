"""The npz archiver: files readable with plain numpy, a step whole only with every frame its tokens count, batches
indexed only when whole and durable, an earlier run kept aside until the new one is complete."""

import json
import threading
import time
import zipfile

import numpy as np
import pytest
from helpers import Engine, tiny_generator

import gemmalens
from gemmalens.files import WriteError
from gemmalens.sinks.npz import INDEX, NpzArchiver, folder_state


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
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["complete"] and index["axes"]["model.layers.0.resid_out"] == ["batch", "seq", "hidden"]


def finished_batch(sink, engine, batch, array, dtype="float32", steps=1, names=("a",), drop=()):
    """Batch ``batch`` (one prompt, also numbered ``batch``) sends ``array`` under each name at each step, less
    the (step, name) pairs in ``drop`` (lost on the way); its tokens count every frame sent."""
    for step in range(steps):
        for name in names:
            message = engine.activation(batch, step, name, array, dtype)
            if (step, name) not in drop:
                sink.handle(message)
        sink.handle(engine.tokens(batch, step, [batch], [7], len(names)))
    sink.handle(engine.batch_end(batch, [batch], steps))


def test_a_batch_with_a_lost_frame_is_not_indexed(tmp_path):
    engine, sink = Engine(), NpzArchiver("inproc://unused-npz", tmp_path)
    sink.handle(engine.run_start([0, 1]))
    finished_batch(sink, engine, 0, np.zeros((1, 1), np.float32), names=("a", "b"))
    finished_batch(sink, engine, 1, np.zeros((1, 1), np.float32), names=("a", "b"), drop={(0, "b")})
    sink.handle(engine.run_end())
    sink.close()
    assert gemmalens.open_activations(tmp_path).prompts == [0]
    assert not sink.complete and "missing 1 act.b" in sink.shortfall() and "not whole" in sink.shortfall()
    assert json.loads((tmp_path / INDEX).read_text())["complete"] is False


def test_frames_of_one_step_keep_their_own_positions(tmp_path):
    engine, sink = Engine(), NpzArchiver("inproc://unused-npz", tmp_path)
    sink.handle(engine.run_start([0]))
    for name, width, slot in [("a", 3, 0), ("b", 1, 2), ("c", 3, 0)]:  # b's positions differ from a's and c's
        sink.handle(engine.activation(0, 0, name, np.zeros((1, width), np.float32), slot=slot))
    sink.handle(engine.tokens(0, 0, [0], [5], 3))
    sink.handle(engine.batch_end(0, [0], 1))
    sink.handle(engine.run_end())
    sink.close()
    with np.load(tmp_path / "activations_step_0_batch_0.npz") as step0:
        assert [step0[f"{name}.positions"].tolist() for name in "abc"] == [[[0, 1, 2]], [[2]], [[0, 1, 2]]]
    assert sink.complete


def test_bfloat16_frames_are_stored_as_the_exact_float32_values(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 2.0 ** -60, -0.0, 65280.0], np.float32).reshape(1, 2, 3)  # all exact in bf16
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    engine, sink = Engine(), NpzArchiver("inproc://unused-npz", tmp_path, compress=True, writers=2)
    sink.handle(engine.run_start([0]))
    finished_batch(sink, engine, 0, bits, dtype="bfloat16")
    sink.handle(engine.run_end())
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
    engine, sink = Engine(), NpzArchiver("inproc://unused-npz", tmp_path, writers=1)  # backlog: 2 steps
    sink.handle(engine.run_start([0]))
    receiving = threading.Thread(target=finished_batch, args=(sink, engine, 0, np.ones((1, 2, 3), np.float32)),
                                 kwargs={"steps": 4})
    receiving.start()
    time.sleep(0.5)
    handed_over = sink.open[0]["sent"]
    release.set()
    receiving.join(10)
    assert handed_over == sink.files.backlog + 1  # two steps waiting, the third's hand-over waits for the first
    sink.handle(engine.run_end())
    sink.close()
    assert len(gemmalens.open_activations(tmp_path).get("a")[0]) == 4


def test_a_failed_write_stops_the_sink_naming_the_file_and_keeps_the_batches_already_indexed(tmp_path, monkeypatch):
    import gemmalens.sinks.npzfile as npzfile

    engine, sink = Engine(), NpzArchiver("inproc://unused-npz", tmp_path, writers=2)
    sink.handle(engine.run_start([0, 1]))
    finished_batch(sink, engine, 0, np.ones((1, 2, 3), np.float32))
    while 0 in sink.open:  # batch 0 written and indexed
        time.sleep(0.05)
        sink._take(sink.writer.outcomes())
    original = npzfile.StagedFile.write_to

    def disk_full(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(npzfile.StagedFile, "write_to", disk_full)
    with pytest.raises(WriteError, match=r"activations_step_0_batch_1\.npz: the disk is full"):
        finished_batch(sink, engine, 1, np.ones((1, 2, 3), np.float32))
        time.sleep(0.5)
        sink.handle(engine.run_end())
    monkeypatch.setattr(npzfile.StagedFile, "write_to", original)
    sink.abort("sink failed")
    activations = gemmalens.open_activations(tmp_path)
    assert activations.prompts == [0]
    assert activations.get("a")[0][0][1].tolist() == [[1.0] * 3] * 2
    assert not list(tmp_path.glob(".*.partial")) and not sink.complete


@pytest.mark.parametrize("positions, steps", [("generated", [1, 2]), ("prompt", [0])])
def test_a_run_capturing_some_steps_only_is_indexed_and_read_back(tmp_path, positions, steps):
    model, tokenizer = tiny_generator()
    results = gemmalens.batch_generate(model, tokenizer, ["one two three four", "five"], max_tokens=3, temperature=0,
                                       save_activations_dir=tmp_path, capture=["model.layers.0.resid_out"],
                                       positions=positions)
    activations = gemmalens.open_activations(tmp_path)
    assert activations.prompts == [0, 1] and activations.tokens == {r.index: r.tokens for r in results}
    assert sorted(activations.get("model.layers.0.resid_out")[1]) == steps


def test_a_new_run_keeps_a_complete_earlier_run_aside_until_it_is_complete_itself(tmp_path):
    first = Engine("first")
    sink = NpzArchiver("inproc://unused-npz", tmp_path)
    sink.handle(first.run_start([0]))
    finished_batch(sink, first, 0, np.full((1, 1), 1.0, np.float32))
    sink.handle(first.run_end())
    sink.close()
    second = Engine("second")
    sink = NpzArchiver("inproc://unused-npz", tmp_path)
    assert sink.state()["complete"] and sink.state()["have"] == [0]
    sink.handle(second.run_start([0, 1]))
    finished_batch(sink, second, 0, np.full((1, 1), 2.0, np.float32))
    aside = tmp_path / ".replaced" / "first"
    with np.load(aside / "activations_step_0_batch_0.npz") as kept:  # the earlier run, intact while this one runs
        assert kept["a"].tolist() == [[1.0]]
    sink.handle(second.run_end(complete=False, reason="interrupted"))  # batch 1 never came
    sink.close()
    assert aside.exists() and folder_state(tmp_path) == {"folder": str(tmp_path), "run": "second", "complete": False,
                                                         "have": [0], "spec": {}}
    third = Engine("third")
    sink = NpzArchiver("inproc://unused-npz", tmp_path)
    sink.handle(third.run_start([0, 1], resume=True))
    finished_batch(sink, third, 1, np.full((1, 1), 3.0, np.float32))
    sink.handle(third.run_end())
    sink.close()
    assert not (tmp_path / ".replaced").exists() and gemmalens.open_activations(tmp_path).prompts == [0, 1]


def test_two_archivers_cannot_share_a_folder(tmp_path):
    from gemmalens.errors import FolderBusy

    first = NpzArchiver("inproc://unused-npz", tmp_path)
    with pytest.raises(FolderBusy, match=r"in use by another gemmalens run \(pid \d+ on"):
        NpzArchiver("inproc://unused-npz2", tmp_path)
    first.close()
    NpzArchiver("inproc://unused-npz3", tmp_path).close()  # free again once the holder closed
