"""The results writer: a line per result as it arrives, never twice; speeds over every segment of a resumed run;
an earlier run kept aside until the new one is complete; what it holds told to the engine."""

import json

from helpers import Engine, load_json

from gemmalens.sinks.results import ResultsWriter, folder_state


def segment(folder, engine, prompts, done, resume=False, complete=True, tokens=4, seconds=2.0):
    sink = ResultsWriter("inproc://unused-results", folder)
    sink.handle(engine.run_start(prompts, resume=resume, spec={"seed": 3}))
    for index in done:
        sink.handle(engine.result(index))
    end = engine.run_end(complete=complete, reason=None if complete else "interrupted")
    body = json.loads(end[2])
    body.update(tokens=tokens, seconds=seconds)
    end[2] = json.dumps(body).encode()
    sink.handle(end)
    sink.close()
    return sink


def test_a_resumed_run_counts_every_segment_in_its_speed_and_no_result_twice(tmp_path):
    segment(tmp_path, Engine("one"), [0, 1, 2], done=[0, 1], complete=False, tokens=10, seconds=4.0)
    assert folder_state(tmp_path) == {"folder": str(tmp_path), "run": "one", "complete": False, "have": [0, 1],
                                      "spec": {"seed": 3}}
    sink = segment(tmp_path, Engine("two"), [0, 1, 2], done=[1, 2], resume=True, tokens=5, seconds=1.0)
    summary = load_json(tmp_path / "summary.json")
    assert summary["complete"] and sink.complete
    assert summary["tokens_per_second"] == 15 / 5.0 and summary["wall_seconds"] == 5.0
    assert [s["run"] for s in summary["segments"]] == ["one", "two"]
    ids = [json.loads(line)["id"] for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert ids == [0, 1, 2]
    assert [r["id"] for r in load_json(tmp_path / "results.json")] == [0, 1, 2]


def test_the_result_rows_are_the_messages_as_sent(tmp_path):
    engine = Engine()
    sink = ResultsWriter("inproc://unused-results", tmp_path)
    sink.handle(engine.run_start([0]))
    message = engine.result(0)
    sink.handle(message)
    sink.handle(engine.run_end())
    sink.close()
    assert load_json(tmp_path / "results.json") == [json.loads(message[2])]
    assert load_json(tmp_path / "run_config.json") == {}


def test_an_earlier_complete_run_is_kept_aside_until_the_new_one_completes(tmp_path):
    segment(tmp_path, Engine("one"), [0], done=[0])
    segment(tmp_path, Engine("two"), [0, 1], done=[0], complete=False)
    summary = load_json(tmp_path / "summary.json")
    assert not summary["complete"] and summary["replaced_outputs"] == str(tmp_path / ".replaced")
    assert load_json(tmp_path / ".replaced" / "one" / "summary.json")["complete"]
    segment(tmp_path, Engine("three"), [0, 1], done=[1], resume=True)
    assert load_json(tmp_path / "summary.json")["complete"] and not (tmp_path / ".replaced").exists()


def test_a_sink_that_got_nothing_of_a_run_writes_nothing(tmp_path):
    sink = ResultsWriter("inproc://unused-results", tmp_path / "out")
    sink.abort("stopped")
    assert not (tmp_path / "out" / "summary.json").exists()
