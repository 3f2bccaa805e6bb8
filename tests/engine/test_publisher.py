"""The bus: every frame reaches a subscriber in another process, gaps are detected, back-pressure works."""

import json
import subprocess
import sys
import textwrap
import threading
import time

import mlx.core as mx
import pytest
import zmq
from helpers import tiny_generator

from gemmalens.engine.frames import message
from gemmalens.engine.generation import ActivationEvent, GenerationConfig, StepEvent, generate
from gemmalens.engine.prompts import Prompt
from gemmalens.engine.publisher import Publisher, PublisherError
from gemmalens.engine.run import publish_run, run_info
from gemmalens.engine.sampling import SamplingParams
from gemmalens.engine.selection import select
from gemmalens.engine.transfer import StepValues, host_copier
from gemmalens.sinks.base import LossySubscriber, Subscriber

SUBSCRIBER = textwrap.dedent('''
    import json, sys, time
    from gemmalens.sinks.base import Subscriber

    class Recorder(Subscriber):
        def __init__(self, *args, delay=0.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.delay, self.log = delay, []

        def handle(self, parts):
            super().handle(parts)
            topic, header = parts[0].decode(), json.loads(parts[1])
            body = json.loads(bytes(parts[2])) if topic == "tokens" else header
            self.log.append((topic, header["seq"], body.get("batch"), body.get("step")))

        def on_activation(self, frame):
            time.sleep(self.delay)

    sink = Recorder(sys.argv[1], name="recorder", delay=float(sys.argv[3]))
    complete = sink.run(timeout=120)
    json.dump({"complete": complete, "log": sink.log, "gaps": sink.gaps, "summary": sink.summary}, open(sys.argv[2], "w"))
''')


def small_run(publisher, max_tokens=4, capture=("model.layers.*.resid_out", "generate.*.sample.token")):
    model, tokenizer = tiny_generator()
    prompts = [Prompt(i, text) for i, text in enumerate(["one prompt", "a second prompt", "third"])]
    config = GenerationConfig(max_tokens=max_tokens, sampling=SamplingParams(0.0, 1.0, None, 1.0), batch_size=2)
    selection = select(model.config, list(capture))
    return publish_run(model, tokenizer, prompts, config, selection, publisher,
                       run_info(model, config, selection, prompts))


def start_subscriber(address, out, delay=0.0):
    return subprocess.Popen([sys.executable, "-c", SUBSCRIBER, address, str(out), str(delay)])


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_subscriber_in_another_process_receives_every_frame_in_order(tmp_path, transport):
    address = "tcp://127.0.0.1:0" if transport == "tcp" else f"ipc://{tmp_path}/bus"
    publisher = Publisher(reliable=address, expect=1, sync_timeout=60)
    sink = start_subscriber(publisher.endpoints["reliable"], tmp_path / "out.json")
    results, totals = small_run(publisher)
    assert sink.wait(60) == 0
    received = json.loads((tmp_path / "out.json").read_text())
    assert received["complete"] and not received["gaps"] and totals["complete"]
    by_topic = {}
    for topic, seq, *_ in received["log"]:
        by_topic.setdefault(topic, []).append(seq)
    assert all(seqs == list(range(len(seqs))) for seqs in by_topic.values())
    assert {t: len(s) for t, s in by_topic.items() if t in totals["topics"]} == totals["topics"]
    assert totals["topics"]["result"] == len(results) == 3
    assert totals["topics"]["act.model.layers.0.resid_out"] == 2 * 4  # two batches, four steps


def test_large_frames_compressed_on_the_pool_keep_their_place_before_the_steps_tokens(tmp_path, monkeypatch):
    from gemmalens.engine import publisher as module

    monkeypatch.setattr(module, "INLINE_BYTES", 1024)  # the logits go to the pool, resid_out stays with the sender
    publisher = Publisher(reliable=f"ipc://{tmp_path}/bus", expect=1, workers=3)
    sink = start_subscriber(publisher.endpoints["reliable"], tmp_path / "out.json")
    _, totals = small_run(publisher, capture=("model.logits", "model.layers.*.resid_out"))
    assert sink.wait(60) == 0
    received = json.loads((tmp_path / "out.json").read_text())
    assert received["complete"] and not received["gaps"]
    frames = [(topic, batch, step) for topic, _, batch, step in received["log"] if topic.startswith("act.")]
    assert {t for t, _, _ in frames} == {"act.model.logits"} | {f"act.model.layers.{i}.resid_out" for i in range(4)}
    for position, (topic, _, batch, step) in enumerate(received["log"]):
        if topic == "tokens":  # the archiver writes a step's file when its tokens arrive: its frames are all in
            before = {(t, b, s) for t, _, b, s in received["log"][:position] if t.startswith("act.")}
            assert {f for f in frames if f[1:] == (batch, step)} <= before


def test_every_activation_header_names_the_rows_and_positions_of_its_own_step(tmp_path):
    class Headers(Subscriber):
        topics = ("act.",)

        def on_activation(self, frame):
            received.append(frame.header)

    received = []
    publisher = Publisher(reliable=f"ipc://{tmp_path}/bus", expect=1)
    sink = Headers(publisher.endpoints["reliable"], name="headers")
    receiving = threading.Thread(target=sink.run, kwargs={"timeout": 60})
    receiving.start()
    small_run(publisher)  # two batches (rows 0-1, then 2), four steps each, positions moving every step
    receiving.join(60)
    model, tokenizer = tiny_generator()
    config = GenerationConfig(max_tokens=4, sampling=SamplingParams(0.0, 1.0, None, 1.0), batch_size=2)
    selection = select(model.config, ["model.layers.*.resid_out", "generate.*.sample.token"])
    expected = {(e.batch, e.step, e.name): {"prompts": e.indices, "positions": e.positions, "pads": e.pads}
                for e in generate(model, tokenizer, ["one prompt", "a second prompt", "third"], config, selection)
                if isinstance(e, ActivationEvent)}
    assert sink.complete and len(received) == len(expected) == 2 * 4 * 5
    for header in received:
        assert {k: header[k] for k in ("prompts", "positions", "pads")} == expected[header["batch"], header["step"],
                                                                                   header["name"]]


def step_events(step, names=("a", "b", "c")):
    """One step's activation events (two rows, one position each) and its tokens."""
    values = StepValues({name: mx.full((2, 1, 4), float(i)) for i, name in enumerate(names)}, host_copier())
    mx.eval(list(values.buffers.values()))
    return ([ActivationEvent(0, step, name, [0, 1], [[5], [5]], values, [0, 0]) for name in names],
            StepEvent(0, step, [0, 1], [7, 8], [5, 5]))


def test_a_steps_frames_are_queued_with_its_tokens_and_count_toward_the_bound_one_by_one():
    publisher = Publisher(queue_size=64)  # not started: the queue only fills
    frames, tokens = step_events(1)
    for event in frames:
        publisher.publish(event)
    assert publisher._queue.qsize() == 0  # held until the step's tokens
    publisher.publish(tokens)
    assert publisher._queue.qsize() == len(frames) + 1  # one item for the frames, weighing three
    assert publisher._queue.get_nowait() == ("arrays", frames)
    publisher.close()


def test_values_published_without_their_tokens_still_go_out_when_the_run_ends(tmp_path):
    class Headers(Subscriber):
        topics = ("act.",)

        def on_activation(self, frame):
            received.append((frame.header["name"], frame.body.tolist()))

    received = []
    publisher = Publisher(reliable=f"ipc://{tmp_path}/bus", expect=1)
    sink = Headers(publisher.endpoints["reliable"], name="headers")
    receiving = threading.Thread(target=sink.run, kwargs={"timeout": 60})
    receiving.start()
    publisher.start({})
    frames, _ = step_events(1)
    for event in frames:
        publisher.publish(event)
    totals = publisher.finish(False, "interrupted")  # stopped before the step's tokens
    receiving.join(60)
    assert sink.complete and totals["topics"] == {"run.start": 1, "act.a": 1, "act.b": 1, "act.c": 1}
    assert received == [(name, [[[float(i)] * 4]] * 2) for i, name in enumerate("abc")]


def test_a_missing_frame_is_detected_as_a_gap():
    sink = Subscriber("inproc://nowhere", name="gapcheck")
    sink.handle(message("run.start", {"kind": "run_start", "seq": 0}, {}))
    sink.handle(message("result", {"kind": "result", "seq": 0}, {"index": 0}))
    sink.handle(message("result", {"kind": "result", "seq": 2}, {"index": 2}))
    sink.handle(message("run.end", {"kind": "run_end", "seq": 0}, {"topics": {"run.start": 1, "result": 3}}))
    assert sink.gaps == ["result: expected seq 1, got 2"]
    assert not sink.complete and sink.missing() == {"result": 1}
    sink.close()


def test_a_slow_archival_subscriber_still_receives_every_frame(tmp_path):
    publisher = Publisher(reliable="tcp://127.0.0.1:0", expect=1, high_water_mark=2, queue_size=2)
    sink = start_subscriber(publisher.endpoints["reliable"], tmp_path / "out.json", delay=0.05)
    _, totals = small_run(publisher, max_tokens=6, capture=("model.layers.*.resid_out",))
    assert sink.wait(120) == 0
    received = json.loads((tmp_path / "out.json").read_text())
    assert received["complete"] and totals["topics"]["act.model.layers.3.resid_out"] == 12


def test_a_slow_lossy_subscriber_does_not_hold_the_engine_back():
    context = zmq.Context.instance()
    publisher = Publisher(lossy="inproc://lossy-test", context=context, high_water_mark=2)
    seen = []

    class Slow(LossySubscriber):
        def on_activation(self, frame):
            seen.append(frame.header["seq"])
            time.sleep(0.2)

    viewer = Slow("inproc://lossy-test", context=context)
    thread = threading.Thread(target=lambda: viewer.run(timeout=60), daemon=True)
    thread.start()
    time.sleep(0.2)
    _, totals = small_run(publisher, max_tokens=8, capture=("model.layers.*.resid_out",))
    sent = sum(n for t, n in totals["topics"].items() if t.startswith("act."))
    assert sent == 64 and len(seen) < sent / 4  # the engine finished long before the viewer could read it all


def test_the_engine_waits_for_expected_sinks_and_says_who_is_missing():
    publisher = Publisher(reliable="tcp://127.0.0.1:0", expect=2, sync_timeout=0.5)
    with pytest.raises(PublisherError, match=r"for 2 sink\(s\) on tcp://127\.0\.0\.1:\d+, 0 came"):
        publisher.start({})


def test_a_reliable_sink_that_falls_behind_holds_the_engine_back_instead_of_buffering_without_bound():
    context = zmq.Context.instance()
    publisher = Publisher(reliable="inproc://behind-test", expect=1, context=context, high_water_mark=2, queue_size=2)
    stalled, release = threading.Event(), threading.Event()

    class Stalled(Subscriber):
        def on_activation(self, frame):
            stalled.set()
            release.wait()

    sink = Stalled("inproc://behind-test", name="stalled", context=context)
    reader = threading.Thread(target=lambda: sink.run(timeout=120), daemon=True)
    reader.start()
    out = {}
    engine = threading.Thread(target=lambda: out.update(totals=small_run(publisher, max_tokens=4, capture=("*",))[1]))
    engine.start()
    assert stalled.wait(timeout=120)
    engine.join(timeout=2)  # unheld, the rest of this run takes under a second: far more frames than a sink holds
    assert engine.is_alive()
    release.set()
    engine.join(timeout=120)
    reader.join(timeout=120)
    totals = out["totals"]
    assert sum(n for topic, n in totals["topics"].items() if topic.startswith("act.")) > 600
    assert sink.complete and totals["engine_waited_seconds"] > 1 and totals["sinks_waited_seconds"] > 1
    assert sink.summary["engine_waited_seconds"] == totals["engine_waited_seconds"]
