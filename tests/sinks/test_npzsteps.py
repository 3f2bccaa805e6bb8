"""Step files written by helper processes: the same files as one process, failures that stop the archiver."""

import functools
import subprocess
import sys

import numpy as np
import psutil
import pytest
import zmq
from helpers import Engine, tiny_generator

import gemmalens
import gemmalens.api
from gemmalens.sinks.npz import INDEX, NpzArchiver
from gemmalens.sinks.npzsteps import HelperError


def messages(engine=None, batches=(0, 1), steps=3):
    """A run's messages: per batch and step, a bfloat16 frame "a" and a float32 frame "b" (lz4), then tokens."""
    engine = engine or Engine()
    rng = np.random.default_rng(0)
    out = [engine.run_start(list(batches))]
    for batch in batches:
        for step in range(steps):
            for name, dtype in (("a", "bfloat16"), ("b", "float32")):
                values = rng.standard_normal((1, 2, 3)).astype(np.float32)
                wire = (values.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else values
                out.append(engine.activation(batch, step, name, wire, dtype, slot=step))
            out.append(engine.tokens(batch, step, [batch], [7 + step], 2))
        out.append(engine.batch_end(batch, [batch], steps))
    return out


def deliver(sink, parts):
    sink.receive([zmq.Frame(bytes(part)) for part in parts])


def archive(folder, processes, run=None, engine=None):
    engine = engine or Engine()
    sink = NpzArchiver("inproc://unused-npzsteps", folder, processes=processes, writers=2)
    for parts in run or messages(engine):
        deliver(sink, parts)
    deliver(sink, engine.run_end())
    sink.close()
    return sink


def test_helper_processes_write_the_same_files_as_one_process(tmp_path):
    archive(tmp_path / "one", processes=1)
    sink = archive(tmp_path / "two", processes=2)
    assert sink.helpers is not None and all(p.returncode == 0 for p in sink.helpers.processes)
    one = gemmalens.open_activations(tmp_path / "one")
    two = gemmalens.open_activations(tmp_path / "two")
    assert one.index["batches"] == two.index["batches"] and one.tokens == two.tokens and one.prompts == [0, 1]
    for file in (tmp_path / "one").glob("activations_step_*.npz"):
        with np.load(file) as expected, np.load(tmp_path / "two" / file.name) as written:
            assert expected.files == written.files
            for key in expected.files:
                assert expected[key].dtype == written[key].dtype and expected[key].tobytes() == written[key].tobytes()


def test_a_batch_with_a_lost_frame_is_not_indexed_by_helpers(tmp_path):
    engine = Engine()
    run = [m for m in messages(engine) if not (m[0] == b"act.b" and b'"batch": 1, "step": 2' in m[1])]
    sink = archive(tmp_path, processes=2, run=run, engine=engine)
    assert gemmalens.open_activations(tmp_path).prompts == [0] and not sink.complete


def test_a_failed_write_in_a_helper_stops_the_sink_and_keeps_the_batches_already_indexed(tmp_path):
    engine = Engine()
    sink = NpzArchiver("inproc://unused-npzsteps", tmp_path, processes=2, writers=2)
    run = messages(engine)
    deliver(sink, run[0])
    (tmp_path / "activations_step_1_batch_1.npz").mkdir()  # batch 1's step 1 cannot be renamed into place
    with pytest.raises(HelperError, match=r"activations_step_1_batch_1\.npz"):
        for parts in run[1:]:
            deliver(sink, parts)
        deliver(sink, engine.run_end())
    sink.abort("sink failed")
    assert gemmalens.open_activations(tmp_path).prompts == [0]


def test_a_helper_that_dies_stops_the_sink_instead_of_waiting_for_it(tmp_path):
    sink = NpzArchiver("inproc://unused-npzsteps", tmp_path, processes=2, writers=2)
    sink.helpers.processes[1].kill()
    sink.helpers.processes[1].wait()
    with pytest.raises(HelperError, match="helper 1 exited"):
        for parts in messages(steps=400):
            deliver(sink, parts)
    sink.abort("sink failed")
    assert (tmp_path / INDEX).exists()


def test_an_archiver_with_helpers_writes_what_the_engine_computed(tmp_path, monkeypatch):
    model, tokenizer = tiny_generator()
    prompts = ["one two three four", "five", "six seven"]
    for processes in (1, 2):
        monkeypatch.setattr(gemmalens.api, "NpzArchiver", functools.partial(NpzArchiver, processes=processes))
        gemmalens.batch_generate(model, tokenizer, prompts, max_tokens=4, temperature=0, batch_size=2,
                                 save_activations_dir=tmp_path / str(processes), capture=["model.layers.*.resid_out"])
    files = sorted(p.name for p in (tmp_path / "1").glob("activations_step_*.npz"))
    assert files == sorted(p.name for p in (tmp_path / "2").glob("activations_step_*.npz")) and len(files) == 8  # 2 batches, 4 steps
    for name in files:
        with np.load(tmp_path / "1" / name) as expected, np.load(tmp_path / "2" / name) as written:
            assert all(expected[key].tobytes() == written[key].tobytes() for key in expected.files)
    one, two = (gemmalens.open_activations(tmp_path / str(processes)) for processes in (1, 2))
    assert one.index["batches"] == two.index["batches"] and one.tokens == two.tokens and one.prompts == [0, 1, 2]


def test_helpers_exit_when_their_archiver_is_killed(tmp_path):
    script = ("import sys, time\nfrom gemmalens.sinks.npz import NpzArchiver\n"
              "sink = NpzArchiver('tcp://127.0.0.1:9', sys.argv[1], processes=2)\nprint('up', flush=True)\n"
              "time.sleep(120)")
    archiver = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert archiver.stdout.readline().strip() == "up"
    helpers = psutil.Process(archiver.pid).children()
    assert len(helpers) == 2
    archiver.kill()
    archiver.wait()
    _, alive = psutil.wait_procs(helpers, timeout=15)
    assert not alive


def test_sinks_and_their_helpers_import_no_mlx():
    script = ("import sys\nimport gemmalens.sinks.npz, gemmalens.sinks.results, gemmalens.sinks.stats, "
              "gemmalens.sinks.reader, gemmalens.wire, gemmalens.cli.main\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlx' or m.startswith('gemmalens.engine')))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
