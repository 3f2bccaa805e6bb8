"""The bus: every frame reaches a subscriber in another process; the run's end is acknowledged; a lost or stalled
sink is named and makes the run incomplete; back-pressure holds and stops still stop."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import mlx.core as mx
import pytest
import zmq
from helpers import tiny_generator

from gemmalens.engine.events import ActivationEvent, StepEvent
from gemmalens.engine.generation import GenerationConfig, generate
from gemmalens.engine.publisher import Publisher, PublisherError
from gemmalens.engine.run import serve
from gemmalens.engine.sampling import SamplingParams
from gemmalens.engine.selection import select
from gemmalens.engine.transfer import StepValues, host_copier
from gemmalens.prompts import Prompt
from gemmalens.sinks.base import LossySubscriber, Subscriber
from gemmalens.spec import RunSpec

SUBSCRIBER = textwrap.dedent('''
    import json, sys, time
    from gemmalens.sinks.base import Subscriber

    class Recorder(Subscriber):
        def __init__(self, *args, delay=0.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.delay, self.log = delay, []

        def dispatch(self, frame):
            super().dispatch(frame)
            body = frame.body if frame.topic == "tokens" else frame.header
            self.log.append((frame.topic, frame.header["seq"], body.get("batch"), body.get("step")))

        def on_activation(self, frame):
            time.sleep(self.delay)

    sink = Recorder(sys.argv[1], name="recorder", delay=float(sys.argv[3]))
    complete = sink.run(timeout=120)
    json.dump({"complete": complete, "log": sink.log, "gaps": sink.gaps, "summary": sink.summary}, open(sys.argv[2], "w"))
''')
PROMPTS = [Prompt(i, text) for i, text in enumerate(["one prompt", "a second prompt", "third"])]


def small_run(publisher, max_tokens=4, capture=("model.layers.*.resid_out", "generate.*.sample.token"),
              should_stop=lambda: False):
    model, tokenizer = tiny_generator()
    spec = RunSpec(max_tokens=max_tokens, temperature=0.0, top_p=1.0, repetition_penalty=1.0, batch_size=2, seed=1,
                   capture=capture)
    selection = select(model.config, list(capture))
    return serve(model, tokenizer, spec, PROMPTS, PROMPTS, selection, publisher, should_stop=should_stop)


def start_subscriber(address, out, delay=0.0):
    return subprocess.Popen([sys.executable, "-c", SUBSCRIBER, address, str(out), str(delay)])


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_subscriber_in_another_process_receives_every_frame_in_order_and_acknowledges(tmp_path, transport):
    address = "tcp://127.0.0.1:0" if transport == "tcp" else f"ipc://{tmp_path}/bus"
    publisher = Publisher(reliable=address, expect=1, sync_timeout=60)
    sink = start_subscriber(publisher.endpoints["reliable"], tmp_path / "out.json")
    results, totals = small_run(publisher)
    assert sink.wait(60) == 0
    received = json.loads((tmp_path / "out.json").read_text())
    assert received["complete"] and not received["gaps"] and totals["complete"]
    assert totals["sinks"]["recorder"]["complete"] and totals["sinks"]["recorder"]["detail"] == "complete"
    by_topic = {}
    for topic, seq, *_ in received["log"]:
        if not topic.startswith("hello."):  # presence: the welcome and the receipt, outside the numbered stream
            by_topic.setdefault(topic, []).append(seq)
    assert {t: s for t, s in by_topic.items() if s != list(range(len(s)))} == {}
    assert {t: len(s) for t, s in by_topic.items() if t in totals["topics"]} == totals["topics"]  # run.end counted
    assert totals["topics"]["result"] == len(results) == 3 and totals["topics"]["run.end"] == 1
    assert totals["topics"]["act.model.layers.0.resid_out"] == 2 * 4  # two batches, four steps


def test_large_frames_compressed_on_the_pool_keep_their_place_before_the_steps_tokens(tmp_path, monkeypatch):
    from gemmalens.engine import publisher as module

    monkeypatch.setattr(module, "INLINE_BYTES", 1024)  # the logits go to the pool, resid_out stays with the sender
    publisher = Publisher(reliable=f"ipc://{tmp_path}/bus", expect=1, workers=3)
    sink = start_subscriber(publisher.endpoints["reliable"], tmp_path / "out.json")
    small_run(publisher, capture=("model.logits", "model.layers.*.resid_out"))
    assert sink.wait(60) == 0
    received = json.loads((tmp_path / "out.json").read_text())
    assert received["complete"] and not received["gaps"]
    frames = [(topic, batch, step) for topic, _, batch, step in received["log"] if topic.startswith("act.")]
    assert {t for t, _, _ in frames} == {"act.model.logits"} | {f"act.model.layers.{i}.resid_out" for i in range(4)}
    for position, (topic, _, batch, step) in enumerate(received["log"]):
        if topic == "tokens":  # the archiver writes a step's file when its tokens arrive: its frames are all in
            before = {(t, b, s) for t, _, b, s in received["log"][:position] if t.startswith("act.")}
            assert {f for f in frames if f[1:] == (batch, step)} <= before


class Collect(Subscriber):
    topics = ("act.", "tokens")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.headers, self.tokens = [], []

    def on_activation(self, frame):
        self.headers.append(frame.header)

    def on_tokens(self, frame):
        self.tokens.append(frame.body)


def in_thread(sink, **kwargs):
    thread = threading.Thread(target=sink.run, kwargs={"timeout": 120, **kwargs}, daemon=True)
    thread.start()
    return thread


def test_headers_say_rows_slots_axes_and_liveness_and_tokens_count_the_steps_frames(tmp_path):
    publisher = Publisher(reliable=f"ipc://{tmp_path}/bus", expect=1)
    sink = Collect(publisher.endpoints["reliable"], name="headers")
    receiving = in_thread(sink)
    small_run(publisher)  # two batches (rows 0-1, then 2), four steps each
    receiving.join(60)
    model, tokenizer = tiny_generator()
    config = GenerationConfig(max_tokens=4, sampling=SamplingParams(0.0, 1.0, None, 1.0), batch_size=2)
    selection = select(model.config, ["model.layers.*.resid_out", "generate.*.sample.token"])
    expected = {(e.batch, e.step, e.name): e for e in generate(model, tokenizer, PROMPTS, config, selection)
                if isinstance(e, ActivationEvent)}
    assert sink.complete and len(sink.headers) == len(expected) == 2 * 4 * 5
    for header in sink.headers:
        event = expected[header["batch"], header["step"], header["name"]]
        assert (header["prompts"], header["pads"], header["live"], header["slot"], tuple(header["axes"])) == (
            event.indices, event.pads, event.live, event.slot, event.axes)
    for tokens in sink.tokens:
        assert tokens["frames"] == sum(1 for h in sink.headers if (h["batch"], h["step"]) == (tokens["batch"],
                                                                                              tokens["step"]))


def step_events(step, names=("a", "b", "c")):
    """One step's activation events (two rows, one position each) and its tokens."""
    values = StepValues({name: mx.full((2, 1, 4), float(i)) for i, name in enumerate(names)}, host_copier())
    mx.eval(list(values.buffers.values()))
    return ([ActivationEvent(0, step, name, ("batch", "seq", "hidden"), [0, 1], [0, 0], [True, True], 5, values)
             for name in names], StepEvent(0, step, [0, 1], [7, 8], [5, 5], len(names)))


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
    publisher = Publisher(reliable=f"ipc://{tmp_path}/bus", expect=1)
    sink = Collect(publisher.endpoints["reliable"], name="headers")
    receiving = in_thread(sink)
    publisher.wait_for_sinks()
    publisher.start({"spec": {}, "prompts": [], "capture": {}, "engines": 1, "segment": {}})
    frames, _ = step_events(1)
    for event in frames:
        publisher.publish(event)
    totals = publisher.finish(False, "interrupted")  # stopped before the step's tokens
    receiving.join(60)
    assert totals["topics"] == {"run.start": 1, "act.a": 1, "act.b": 1, "act.c": 1, "run.end": 1}
    assert [h["name"] for h in sink.headers] == ["a", "b", "c"]
    assert not sink.complete and sink.shortfall_parts(engine=False) == []  # it has all; the engine was stopped


def test_a_slow_archival_subscriber_receives_every_frame_and_the_engine_waits_for_its_ack(tmp_path):
    """The engine must not leave before a slow sink has everything (it used to close after 5 s of linger)."""
    publisher = Publisher(reliable="tcp://127.0.0.1:0", expect=1, high_water_mark=2, queue_size=2)
    sink = start_subscriber(publisher.endpoints["reliable"], tmp_path / "out.json", delay=0.05)
    _, totals = small_run(publisher, max_tokens=6, capture=("model.layers.*.resid_out",))
    assert totals["complete"] and totals["sinks"]["recorder"]["complete"]
    assert sink.poll() is None or sink.returncode == 0  # the engine returned only after its ack
    assert sink.wait(120) == 0
    received = json.loads((tmp_path / "out.json").read_text())
    assert received["complete"] and totals["topics"]["act.model.layers.3.resid_out"] == 12


def test_a_sink_killed_mid_run_is_named_and_the_run_is_incomplete(tmp_path):
    publisher = Publisher(reliable="tcp://127.0.0.1:0", expect=1, high_water_mark=2, queue_size=2, reconnect_grace=1)
    sink = start_subscriber(publisher.endpoints["reliable"], tmp_path / "out.json", delay=0.05)
    killer = when_running(publisher, lambda: sink.send_signal(signal.SIGKILL))  # after its hello, however slow
    _, totals = small_run(publisher, max_tokens=40, capture=("model.layers.*.resid_out",))
    killer.join()
    assert not totals["complete"] and "sink recorder disconnected" in totals["reason"]
    assert totals["sinks"]["recorder"]["complete"] is False


def when_running(publisher, action, after=0.5):
    """Runs ``action`` in a thread ``after`` seconds into the run's first step, however long the sink took to
    start (a SIGSTOP before its hello would test the wait for sinks instead)."""
    started = threading.Event()
    original = publisher.publish

    def publish(event):
        if isinstance(event, StepEvent):
            started.set()
        return original(event)

    publisher.publish = publish
    thread = threading.Thread(target=lambda: (started.wait(120), time.sleep(after), action()))
    thread.start()
    return thread


def test_a_stopped_sink_is_named_after_the_sink_timeout(tmp_path):
    publisher = Publisher(reliable="tcp://127.0.0.1:0", expect=1, high_water_mark=2, queue_size=2, sink_timeout=3)
    sink = start_subscriber(publisher.endpoints["reliable"], tmp_path / "out.json", delay=0.01)
    stopper = when_running(publisher, lambda: sink.send_signal(signal.SIGSTOP))
    try:
        _, totals = small_run(publisher, max_tokens=60, capture=("model.layers.*.resid_out",))
    finally:
        stopper.join()
        sink.send_signal(signal.SIGCONT)
        sink.kill()
    assert not totals["complete"] and "sink recorder stopped answering" in totals["reason"]


def test_a_stop_request_ends_the_run_while_a_sink_is_stalled(tmp_path):
    publisher = Publisher(reliable="tcp://127.0.0.1:0", expect=1, high_water_mark=2, queue_size=2)
    sink = start_subscriber(publisher.endpoints["reliable"], tmp_path / "out.json", delay=0.01)
    stop, asked = threading.Event(), {}

    def stall_then_stop():
        os.kill(sink.pid, signal.SIGSTOP)
        time.sleep(1)
        asked["at"] = time.monotonic()
        stop.set()

    stopper = when_running(publisher, stall_then_stop)
    try:
        _, totals = small_run(publisher, max_tokens=200, capture=("model.layers.*.resid_out",),
                              should_stop=stop.is_set)
        returned = time.monotonic()
    finally:
        stopper.join()
        sink.send_signal(signal.SIGCONT)
        sink.kill()
    assert stop.is_set() and not totals["complete"] and "interrupted" in totals["reason"]
    assert returned - asked["at"] < 5


def test_a_subscriber_that_joins_after_the_run_started_never_claims_it(tmp_path):
    publisher = Publisher(reliable=f"ipc://{tmp_path}/bus", expect=1)
    first = Collect(publisher.endpoints["reliable"], name="first")
    in_thread(first)
    joined = {}
    original = publisher.publish

    def publish(event):  # the late sink connects once the run is under way
        if "thread" not in joined and isinstance(event, StepEvent):
            joined["sink"] = Collect(publisher.endpoints["reliable"], name="late")
            joined["thread"] = in_thread(joined["sink"])
            time.sleep(0.5)
        original(event)

    publisher.publish = publish
    _, totals = small_run(publisher)
    joined["thread"].join(60)
    assert totals["complete"] and first.complete and list(totals["sinks"]) == ["first"]
    assert not joined["sink"].complete and "run.start missed" in joined["sink"].shortfall()


def test_a_slow_lossy_subscriber_does_not_hold_the_engine_back():
    context = zmq.Context.instance()
    publisher = Publisher(lossy="inproc://lossy-test", context=context, high_water_mark=2)
    seen = []

    class Slow(LossySubscriber):
        def on_activation(self, frame):
            seen.append(frame.header["seq"])
            time.sleep(0.2)

    viewer = Slow("inproc://lossy-test", context=context)
    in_thread(viewer)
    time.sleep(0.2)
    _, totals = small_run(publisher, max_tokens=8, capture=("model.layers.*.resid_out",))
    sent = sum(n for t, n in totals["topics"].items() if t.startswith("act."))
    assert sent == 64 and len(seen) < sent / 4  # the engine finished long before the viewer could read it all


def test_the_engine_waits_for_expected_sinks_and_says_who_is_missing():
    publisher = Publisher(reliable="tcp://127.0.0.1:0", expect=2, expect_names=("npz",), sync_timeout=0.5)
    with pytest.raises(PublisherError, match=r"for 2 sink\(s\) on tcp://127\.0\.0\.1:\d+, 0 came \(none\), not npz"):
        publisher.wait_for_sinks()


def test_a_busy_port_is_one_sentence():
    first = Publisher(reliable="tcp://127.0.0.1:0")
    try:
        with pytest.raises(PublisherError, match="in use by another process"):
            Publisher(reliable=first.endpoints["reliable"])
    finally:
        first.close()


def test_a_reliable_sink_that_falls_behind_holds_the_engine_back_instead_of_buffering_without_bound():
    context = zmq.Context.instance()
    publisher = Publisher(reliable="inproc://behind-test", expect=1, context=context, high_water_mark=2, queue_size=2)
    stalled, release = threading.Event(), threading.Event()

    class Stalled(Subscriber):
        def on_activation(self, frame):
            stalled.set()
            release.wait()

    sink = Stalled("inproc://behind-test", name="stalled", context=context)
    reader = in_thread(sink)
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


def test_the_ack_of_a_sink_that_exits_at_once_still_reaches_the_engine(tmp_path):
    """A subscriber process may end the moment its run does (os._exit: no time for ZeroMQ to flush): it repeats
    its ack until the engine's receipt, so the engine neither waits nor calls the run incomplete."""
    script = ("import os, sys\nfrom gemmalens.sinks.base import Subscriber\n"
              "sink = Subscriber(sys.argv[1], name='hasty')\nos._exit(0 if sink.run(timeout=60) else 1)")
    publisher = Publisher(reliable=f"ipc://{tmp_path}/bus", expect=1)
    for _ in range(3):
        sink = subprocess.Popen([sys.executable, "-c", script, publisher.endpoints["reliable"]])
        finishing, finish = {}, publisher.finish

        def timed_finish(*args, finish=finish, **kwargs):  # the run's end to the engine's return: the ack's wait
            finishing["from"] = time.monotonic()
            return finish(*args, **kwargs)

        publisher.finish = timed_finish
        _, totals = small_run(publisher, max_tokens=2)
        assert totals["complete"] and totals["sinks"]["hasty"]["complete"]
        assert time.monotonic() - finishing["from"] < 8  # not a sink timeout's wait
        assert sink.wait(30) == 0
        publisher = Publisher(reliable=f"ipc://{tmp_path}/bus", expect=1)
    publisher.close()
