"""Live control: a controller changes the interventions of a running generation, step by step in sync mode; a
silent controller times out as configured; bad requests are refused without harming the run."""

import json
import threading

import numpy as np
import pytest
import zmq
from helpers import tiny_generator

import gemmalens
from gemmalens.control import ControlError, Controller
from gemmalens.engine.control import ControlServer, ControlTimeout
from gemmalens.engine.events import ActivationEvent, InterventionEvent, ResultEvent
from gemmalens.engine.generation import GenerationConfig, generate
from gemmalens.engine.sampling import SamplingParams
from gemmalens.engine.selection import select
from gemmalens.prompts import Prompt

SITE = "model.layers.1.resid_out"
PROMPTS = [Prompt(0, "a prompt"), Prompt(1, "another, longer prompt")]


@pytest.fixture(scope="module")
def tiny():
    return tiny_generator()


def run(tiny, control=None, max_tokens=5):
    model, tokenizer = tiny
    config = GenerationConfig(max_tokens=max_tokens, sampling=SamplingParams(0.0, 1.0, None, 1.0), seed=1,
                              batch_size=2)
    return list(generate(model, tokenizer, PROMPTS, config, select(model.config, [SITE]), control=control))


def values_by_step(events):
    return {e.step: np.array(e.host()[0]) for e in events if isinstance(e, ActivationEvent)}


def in_thread(work):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", work()), daemon=True)
    thread.start()
    return thread, out


def test_a_synchronous_controller_edits_exactly_the_steps_it_chose(tiny, tmp_path):
    model, _ = tiny
    vector = np.full(model.config.hidden_size, 2.0, np.float32)
    address = f"ipc://{tmp_path}/control"
    server = ControlServer(address, model.config, sync=True, timeout=30)

    def steer_step_two():
        with Controller(address, timeout=30) as controller:
            replies = [controller.go(), controller.apply([gemmalens.steer(SITE, vector, name="up")]), controller.go(),
                       controller.clear(), controller.go(), controller.go()]
        return [(r["batch"], r["step"], [i["id"] for i in r["in_force"]]) for r in replies]

    thread, out = in_thread(steer_step_two)
    try:
        events = run(tiny, server)
    finally:
        server.close()
    thread.join(30)
    assert out["result"] == [(0, 1, []), (0, 2, ["up"]), (0, 2, ["up"]), (0, 3, []), (0, 3, []), (0, 4, [])]
    announced = [(e.step, [i["id"] for i in e.interventions]) for e in events if isinstance(e, InterventionEvent)]
    assert announced == [(2, ["up"]), (3, [])]
    assert all(e.result.interventions == ["up"] for e in events if isinstance(e, ResultEvent))
    plain, edited = values_by_step(run(tiny)), values_by_step(events)
    for step in (0, 1):
        assert np.array_equal(plain[step], edited[step])
    assert np.allclose(edited[2] - plain[2], 2.0, atol=1e-4)


def test_a_silent_controller_releases_the_run_or_stops_it_as_configured(tiny, tmp_path):
    model, _ = tiny
    going_on = ControlServer(f"ipc://{tmp_path}/a", model.config, sync=True, timeout=0.3)
    try:
        events = run(tiny, going_on, max_tokens=3)
    finally:
        going_on.close()
    assert sum(isinstance(e, ResultEvent) for e in events) == 2
    assert going_on.notes and "no controller's go within 0.3 s at batch 0 step 1" in going_on.notes[0]
    stopping = ControlServer(f"ipc://{tmp_path}/b", model.config, sync=True, timeout=0.3, on_timeout="stop")
    try:
        with pytest.raises(ControlTimeout, match="step 1"):
            run(tiny, stopping, max_tokens=3)
    finally:
        stopping.close()


def test_bad_requests_are_refused_and_the_run_goes_on(tiny, tmp_path):
    model, _ = tiny
    address = f"ipc://{tmp_path}/control"
    server = ControlServer(address, model.config)

    def misbehave():
        answers = []
        socket = zmq.Context.instance().socket(zmq.REQ)
        socket.connect(address)
        for raw in (b"\xff not json", b"[" * 100000, b"[1, 2]", json.dumps({"op": "explode"}).encode(),
                    json.dumps({"op": "apply", "interventions": [{"op": "zero", "site": "model.layers.9.mlp"}]}).encode()):
            socket.send(raw)
            answers.append(json.loads(socket.recv()))
        socket.close(linger=0)
        with Controller(address, timeout=30) as controller:
            try:
                controller.apply([{"op": "add", "site": SITE, "vector": [1.0, 2.0]}])
            except ControlError as error:
                answers.append({"ok": False, "error": str(error)})
            answers.append(controller.list())
        return answers

    thread, out = in_thread(misbehave)
    thread.join(30)  # answered before the run starts: the socket has its own thread
    try:
        events = run(tiny, server, max_tokens=3)
    finally:
        server.close()
    answers = out["result"]
    assert [a["ok"] for a in answers] == [False] * 6 + [True]
    assert "'op' one of apply, clear, list, go" in answers[2]["error"]
    assert "not a site this model can edit" in answers[4]["error"] and "the site takes" in answers[5]["error"]
    assert answers[6]["in_force"] == []
    assert sum(isinstance(e, ResultEvent) for e in events) == 2


def test_the_in_process_api_opens_a_control_socket_too(tiny, tmp_path):
    model, tokenizer = tiny
    address = f"ipc://{tmp_path}/control"

    def steer_then_go():
        with Controller(address, timeout=30) as controller:
            applied = controller.apply([gemmalens.steer(SITE, np.ones(model.config.hidden_size), name="api")])
            return applied["step"], [controller.go()["step"] for _ in range(2)]

    thread, out = in_thread(steer_then_go)
    results = gemmalens.batch_generate(model, tokenizer, ["one", "two"], max_tokens=3, temperature=0,
                                       control=address, control_sync=True, control_timeout=30)
    thread.join(30)
    assert out["result"] == (1, [1, 2])
    assert [r.interventions for r in results] == [["api"], ["api"]]
