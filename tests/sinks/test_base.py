"""The subscriber base: hostile or broken messages are refused, counted and survived; a stranger's subscriber written
from docs/protocol.md with gemmalens.wire alone decodes a run exactly as the npz archive holds it."""

import json
import random
import threading

import numpy as np
import zmq
from helpers import Engine, tiny_generator

import gemmalens
from gemmalens import wire
from gemmalens.engine.publisher import Publisher
from gemmalens.engine.run import serve
from gemmalens.engine.selection import select
from gemmalens.prompts import Prompt
from gemmalens.sinks.base import Subscriber
from gemmalens.sinks.npz import NpzArchiver
from gemmalens.spec import RunSpec


class Counter(Subscriber):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.activations, self.results = 0, 0

    def on_activation(self, frame):
        self.activations += 1

    def on_result(self, result):
        self.results += 1


def valid_run(engine):
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    return [engine.run_start([0, 1]), engine.activation(0, 0, "model.layers.0.resid_out", array),
            engine.tokens(0, 0, [0, 1], [5, 6], 1), engine.result(0), engine.result(1), engine.batch_end(0, [0, 1], 1)]


def mutations(parts, rng):
    """Broken versions of one message: truncated, bit-flipped, reordered, emptied, oversized prefixes."""
    topic, header, payload = (bytes(p) for p in parts)
    out = [[topic, header], [topic, header, payload, b"extra"], [b"", header, payload], [topic, b"", payload],
           [topic, header[: rng.randrange(len(header))], payload], [topic, header, payload[: len(payload) // 2]],
           [rng.randbytes(len(topic)), header, payload], [topic, rng.randbytes(len(header)), payload],
           [topic, header, rng.randbytes(len(payload) + 8)], [topic, header.replace(b'"v": 2', b'"v": 3'), payload]]
    flipped = bytearray(header)
    for _ in range(3):
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
    out.append([topic, bytes(flipped), payload])
    if payload[:4]:
        out.append([topic, header, (1 << 31).to_bytes(4, "little") + payload[4:]])
    return out


def test_random_and_truncated_messages_of_every_kind_are_refused_and_the_sink_survives():
    rng = random.Random(7)
    engine = Engine()
    sink = Counter("inproc://unused-fuzz", name="fuzz")
    sink.stream = open("/dev/null", "w")
    good = valid_run(engine)
    sink.handle(good[0])
    hostile = 0
    for parts in good[1:] * 30:
        for broken in mutations(parts, rng):
            before = sum(sink.rejected.values())
            sink.handle(broken)  # never raises
            hostile += sum(sink.rejected.values()) - before
    assert hostile > 500
    for parts in good[1:]:  # valid messages still go through, in sequence
        sink.handle(parts)
    sink.handle(engine.run_end())
    sink.close()
    assert sink.activations >= 1 and sink.results >= 2
    assert sum(sink.rejected.values()) == hostile and not sink.complete and "refused" in sink.shortfall()


def test_a_hostile_publisher_does_not_kill_a_sink_in_another_process(tmp_path):
    import subprocess
    import sys
    import time

    address = f"ipc://{tmp_path}/hostile"
    socket = zmq.Context.instance().socket(zmq.XPUB)
    socket.bind(address)
    script = ("import sys\nfrom gemmalens.sinks.base import Subscriber\n"
              "sink = Subscriber(sys.argv[1], name='everything')\n"
              "print(sink.run(timeout=60), sum(sink.rejected.values()))")
    sink = subprocess.Popen([sys.executable, "-c", script, address], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert socket.poll(30000) and socket.recv()  # its subscriptions arrive
    time.sleep(1)
    engine = Engine()
    good = valid_run(engine)
    activation = good[1]
    head = json.loads(activation[1])
    hostile = [[b"\xff\xfe", b"{}", b""], [b"result", b"[1, 2]", b""], [b"act.x", b"{bad", b""],
               [b"act.../../x", json.dumps({**head, "name": "../../x"}).encode(), activation[2]],
               [activation[0], json.dumps({**head, "dtype": "object"}).encode(), activation[2]],
               [activation[0], json.dumps({**head, "seq": "3"}).encode(), activation[2]],
               [activation[0], activation[1], bytes(activation[2])[:-3]],
               [activation[0], activation[1], (2 << 30).to_bytes(4, "little") + bytes(activation[2])[4:]],
               [activation[0], activation[1]], [b"tokens", b'{"v": 2}', b"{}"]]
    for parts in [good[0], *hostile, *good[1:], engine.run_end()]:
        socket.send_multipart(parts)
    out, err = sink.communicate(timeout=60)
    socket.close(0)
    assert sink.returncode == 0, err
    complete, rejected = out.split()
    assert complete == "False" and int(rejected) == len(hostile) and "refused a message" in err


class Stranger(threading.Thread):
    """A subscriber written from docs/protocol.md with gemmalens.wire and pyzmq only (no gemmalens.sinks)."""

    def __init__(self, address):
        super().__init__(daemon=True)
        self.socket = zmq.Context.instance().socket(zmq.XSUB)
        self.socket.connect(address)
        for topic in ("run.start", "run.end", "act.", "tokens"):
            self.socket.send(b"\x01" + topic.encode())
        self.socket.send(b"\x01" + wire.presence_topic("stranger", "s1").encode())  # last: the engine may start
        self.values: dict = {}

    def run(self):
        while True:
            frame = wire.decode(self.socket.recv_multipart())
            kind = frame.header["kind"]
            if kind == "welcome":
                self.socket.send(wire.hello("stranger", "s1"))
            elif kind == "activation":
                positions = frame.positions()
                axes = frame.header["axes"]
                for row, prompt in enumerate(frame.header["prompts"]):
                    if frame.header["live"][row]:
                        values = np.compress(positions[row] >= 0, frame.body[row], axis=axes.index("seq") - 1)
                        if "keys" in axes:  # key slot pads[row] + j is position j
                            values = values[..., frame.header["pads"][row]:]
                        self.values[prompt, frame.header["step"], frame.header["name"]] = values
            elif kind == "run_end":
                self.socket.send(wire.ack("stranger", "s1", frame.header["run"], True, "complete", {}, 0))
                self.socket.close(linger=1000)
                return


def test_a_strangers_subscriber_decodes_a_run_exactly_as_the_npz_archive_holds_it(tmp_path):
    model, tokenizer = tiny_generator()
    names = ["model.layers.*.resid_out", "model.layers.1.self_attn.attn_weights", "generate.*.sample.token_prob"]
    spec = RunSpec(max_tokens=4, temperature=0.7, seed=2, batch_size=2, capture=tuple(names), wire_dtype="bfloat16")
    prompts = [Prompt(i, t) for i, t in enumerate(["a first prompt", "second", "and a third one"])]
    address = f"ipc://{tmp_path}/bus"
    publisher = Publisher(reliable=address, expect=2, codec="lz4+shuffle")
    archiver = NpzArchiver(address, tmp_path / "acts", name="npz")
    archiving = threading.Thread(target=archiver.run, daemon=True)
    archiving.start()
    stranger = Stranger(address)
    stranger.start()
    _, totals = serve(model, tokenizer, spec, prompts, prompts, select(model.config, names), publisher)
    archiving.join(60)
    stranger.join(60)
    assert totals["complete"] and set(totals["sinks"]) == {"npz", "stranger"}
    archive = gemmalens.open_activations(tmp_path / "acts")
    checked = 0
    for (prompt, step, name), values in stranger.values.items():
        stored = archive.get(name, [prompt], [step])[prompt][step][1]
        assert stored.dtype == values.dtype == np.float32 and stored.tobytes() == values.tobytes(), name
        checked += 1
    assert checked == len(stranger.values) > 50
