"""The npz archiver: files readable with plain numpy, incomplete batches left out of the index."""

import numpy as np
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
