"""The dataset sink on its own: a batch enters the dataset whole, a stopped run never opens as a dataset and
resumes without duplicates, a new run replaces an earlier one only once it is complete."""

import json

import datasets
import numpy as np
import pytest
from helpers import Engine

from gemmalens.sinks.arrowdata import PREVIOUS, PROGRESS, STATE
from gemmalens.sinks.dataset import DatasetSink


def send_batch(sink, engine, batch, steps=2, width=4):
    """Prompt ``batch`` alone in its batch: a prompt pass over 2 positions, then one position per step."""
    for step in range(steps):
        seq = 2 if step == 0 else 1
        values = np.full((1, seq, width), batch * 100 + step, np.float32)
        sink.handle(engine.activation(batch, step, "a", values, slot=0 if step == 0 else step + 1, prompts=[batch]))
        sink.handle(engine.tokens(batch, step, [batch], [7], 1))
    sink.handle(engine.result(batch))
    sink.handle(engine.batch_end(batch, [batch], steps))


def sink_at(folder, **kwargs):
    return DatasetSink("inproc://unused-dataset", folder, shard_mb=1e-6, **kwargs)  # a shard per batch


def test_a_stopped_run_is_no_dataset_and_its_resumption_has_every_row_once(tmp_path):
    engine, sink = Engine(), sink_at(tmp_path)
    sink.handle(engine.run_start([0, 1, 2]))
    send_batch(sink, engine, 0)
    send_batch(sink, engine, 1)
    sink.handle(engine.activation(2, 0, "a", np.zeros((1, 2, 4), np.float32), prompts=[2]))  # batch 2 cut short
    sink.handle(engine.run_end(complete=False, reason="interrupted"))
    sink.close()
    assert not sink.complete and not (tmp_path / STATE).exists()
    with pytest.raises(FileNotFoundError):
        datasets.load_from_disk(str(tmp_path))
    (tmp_path / "data-run1-00009.arrow").write_bytes(b"torn")  # a shard whose writer died
    assert sink_at(tmp_path).state()["have"] == [0, 1]

    engine, resumed = Engine(run="run2"), sink_at(tmp_path)
    resumed.handle(engine.run_start([2], resume=True))
    send_batch(resumed, engine, 2)
    resumed.handle(engine.run_end())
    resumed.close()
    assert resumed.complete and not (tmp_path / "data-run1-00009.arrow").exists()
    rows = datasets.load_from_disk(str(tmp_path)).with_format("numpy")[:]
    assert rows["prompt_id"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert rows["position"].tolist() == [0, 1, 2] * 3 and rows["step"].tolist() == [0, 0, 1] * 3
    assert rows["a"][:, 0].tolist() == [0, 0, 1, 100, 100, 101, 200, 200, 201]
    assert json.loads((tmp_path / PROGRESS).read_text())["complete"] is True


def test_a_new_run_replaces_a_complete_dataset_only_once_it_is_complete_itself(tmp_path):
    engine, sink = Engine(), sink_at(tmp_path)
    sink.handle(engine.run_start([0]))
    send_batch(sink, engine, 0)
    sink.handle(engine.run_end())
    sink.close()
    first = sorted(p.name for p in tmp_path.glob("data-*.arrow"))

    engine, second = Engine(run="run2"), sink_at(tmp_path)
    second.handle(engine.run_start([5]))
    send_batch(second, engine, 5)
    assert (tmp_path / PREVIOUS).exists() and all((tmp_path / f).exists() for f in first)  # kept while it runs
    second.handle(engine.run_end())
    second.close()
    assert not (tmp_path / PREVIOUS).exists() and not any((tmp_path / f).exists() for f in first)
    assert datasets.load_from_disk(str(tmp_path))["prompt_id"][:] == [5, 5, 5]


def test_context_rows_are_windows_of_the_batch_tokens_in_order(tmp_path):
    engine, sink = Engine(), sink_at(tmp_path, rows="context", context_size=2)
    sink.handle(engine.run_start([0]))
    send_batch(sink, engine, 0, steps=3)  # 4 tokens: two windows
    sink.handle(engine.run_end())
    sink.close()
    dataset = datasets.load_from_disk(str(tmp_path))
    assert dataset.features["a"].shape == (2, 4) and dataset.features["position"].length == 2
    rows = dataset.with_format("numpy")[:]
    assert rows["position"].tolist() == [[0, 1], [2, 3]] and rows["a"][:, :, 0].tolist() == [[0, 0], [1, 2]]
