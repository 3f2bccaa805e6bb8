"""The npz archiver: files readable with plain numpy, incomplete batches left out of the index."""

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


def activation(batch, step, name, seq):
    header = {"kind": "activation", "seq": seq, "batch": batch, "step": step, "name": name, "prompts": [0],
              "positions": [[0]], "pads": [0], "dtype": "float32", "shape": [1, 1], "codec": "raw"}
    return message(f"act.{name}", header, np.zeros((1, 1), np.float32).tobytes())


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


RUN_START = {"capture": {"names": ["a"], "sample_patterns": [], "exclude": [], "positions": "all"}, "prompts": []}


def finished_batch(sink, batch, body, dtype="float32", seq=0):
    header = {"kind": "activation", "seq": seq, "batch": batch, "step": 0, "name": "a", "prompts": [batch],
              "positions": [[0, 1]], "pads": [0], "dtype": dtype, "shape": [1, 2, 3], "codec": "raw"}
    sink.handle(message("act.a", header, body))
    sink.handle(message("tokens", {"kind": "tokens", "seq": seq},
                        {"batch": batch, "step": 0, "prompts": [batch], "tokens": [7]}))
    sink.handle(message("batch.end", {"kind": "batch_end", "seq": seq}, {"batch": batch, "prompts": [batch], "steps": 1}))


def test_bfloat16_frames_are_stored_as_the_exact_float32_values(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 2.0 ** -60, -0.0, 65280.0], np.float32).reshape(1, 2, 3)  # all exact in bf16
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    sink = NpzArchiver("inproc://unused-npz", tmp_path, compress=True, writers=2)
    sink.handle(message("run.start", {"kind": "run_start", "seq": 0}, RUN_START))
    finished_batch(sink, 0, bits.tobytes(), dtype="bfloat16")
    sink.handle(message("run.end", {"kind": "run_end", "seq": 0}, {"complete": True, "topics": {}}))
    sink.close()
    with np.load(tmp_path / "activations_step_0_batch_0.npz") as step0:
        assert step0["a"].dtype == np.float32 and step0["a"].tobytes() == values.tobytes()
    assert gemmalens.open_activations(tmp_path).prompts == [0]


def test_a_failed_write_stops_the_sink_and_keeps_the_batches_already_indexed(tmp_path):
    sink = NpzArchiver("inproc://unused-npz", tmp_path, writers=2)
    sink.handle(message("run.start", {"kind": "run_start", "seq": 0}, RUN_START))
    finished_batch(sink, 0, np.ones((1, 2, 3), np.float32).tobytes())
    (tmp_path / ".activations_step_0_batch_1.npz.partial").mkdir()  # batch 1's file cannot be created
    with pytest.raises(IsADirectoryError):
        finished_batch(sink, 1, np.ones((1, 2, 3), np.float32).tobytes(), seq=1)
    sink.abort("sink failed")
    activations = gemmalens.open_activations(tmp_path)
    assert activations.prompts == [0]
    assert activations.get("a")[0][0][1].tolist() == [[1.0] * 3] * 2
