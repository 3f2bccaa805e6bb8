"""The edits each op makes, where and when, on a tiny random model; what is refused and why."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import tiny_generator

import gemmalens
from gemmalens.engine.editing import prepare
from gemmalens.engine.events import ActivationEvent, InterventionEvent, ResultEvent
from gemmalens.engine.generation import GenerationConfig, generate
from gemmalens.engine.sampling import SamplingParams
from gemmalens.engine.selection import select
from gemmalens.errors import ConfigError
from gemmalens.interventions import parse
from gemmalens.prompts import Prompt

SITE = "model.layers.1.resid_out"
ROWS = ["a short one", "a somewhat longer prompt than that", "x"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_generator()


def captured(tiny, name, interventions=(), rows=ROWS):
    model, tokenizer = tiny
    _, values = gemmalens.run_with_capture(model, tokenizer, rows, [name], interventions=interventions)
    return np.array(values[name].astype(mx.float32)), values.pad


def test_add_edits_only_the_chosen_rows_and_positions_and_leaves_the_rest_bit_identical(tiny):
    model, _ = tiny
    vector = np.arange(model.config.hidden_size, dtype=np.float32)
    before, pads = captured(tiny, SITE)
    after, _ = captured(tiny, SITE, [gemmalens.steer(SITE, vector, scale=2.0, prompts=[1], positions=[0, 2])])
    expected = before.copy()
    expected[1, [pads[1], pads[1] + 2]] += 2.0 * vector
    assert np.array_equal(np.delete(after, 1, axis=0), np.delete(before, 1, axis=0))  # other rows: untouched
    assert np.allclose(after, expected, rtol=1e-6, atol=1e-5)
    untouched = np.ones(after.shape[1], bool)
    untouched[[pads[1], pads[1] + 2]] = False
    assert np.array_equal(after[1, untouched], before[1, untouched])


def test_a_later_layer_sees_the_edit_and_the_padding_is_never_edited(tiny):
    before, pads = captured(tiny, "model.layers.2.resid_out")
    after, _ = captured(tiny, "model.layers.2.resid_out", [gemmalens.ablate(SITE)])
    assert not np.allclose(after[0, pads[0]:], before[0, pads[0]:])
    zeroed, _ = captured(tiny, SITE, [gemmalens.ablate(SITE)])
    for row, pad in enumerate(pads):
        assert not zeroed[row, pad:].any()
        assert np.array_equal(zeroed[row, :pad], captured(tiny, SITE)[0][row, :pad])


def test_heads_of_merged_and_per_head_sites_and_clamp_edit_their_slices(tiny):
    model, _ = tiny
    D, H = model.config.head_dim, model.config.num_attention_heads
    merged, _ = captured(tiny, "model.layers.0.self_attn.attn_out", [gemmalens.ablate(
        "model.layers.0.self_attn.attn_out", heads=[1])], rows=ROWS[:1])
    assert not merged[0, :, D:2 * D].any() and merged[0, :, :D].any()
    per_head, _ = captured(tiny, "model.layers.0.self_attn.queries_rope", [gemmalens.ablate(
        "model.layers.0.self_attn.queries_rope", heads=[H - 1], mean=np.full(D, 3.0))], rows=ROWS[:1])
    assert (per_head[0, :, H - 1] == 3.0).all() and not (per_head[0, :, 0] == 3.0).all()
    clamped, _ = captured(tiny, "model.layers.0.mlp.hidden", [gemmalens.clamp("model.layers.0.mlp.hidden", 5, 9.5)],
                          rows=ROWS[:1])
    plain, _ = captured(tiny, "model.layers.0.mlp.hidden", rows=ROWS[:1])
    assert (clamped[0, :, 5] == 9.5).all() and np.array_equal(np.delete(clamped, 5, -1), np.delete(plain, 5, -1))


def test_ops_at_one_site_compose_in_order(tiny):
    model, _ = tiny
    E = model.config.hidden_size
    value = np.full(E, 2.0, np.float32)
    then_add, _ = captured(tiny, SITE, [gemmalens.set_value(SITE, value), gemmalens.steer(SITE, value, scale=3.0)])
    assert np.allclose(then_add[0, -1], 8.0)
    then_set, _ = captured(tiny, SITE, [gemmalens.steer(SITE, value, scale=3.0), gemmalens.set_value(SITE, value)])
    assert np.allclose(then_set[0, -1], 2.0)


def run_steps(tiny, interventions, names=(SITE,), compiled=False, prompts=ROWS, max_tokens=4):
    model, tokenizer = tiny
    config = GenerationConfig(max_tokens=max_tokens, sampling=SamplingParams(0.0, 1.0, None, 1.0), seed=3,
                              batch_size=len(prompts), compiled=compiled)
    selection = select(model.config, list(names))
    events = list(generate(model, tokenizer, [Prompt(i, t) for i, t in enumerate(prompts)], config, selection,
                           prepare(interventions, model.config)))
    values = {(e.step, e.name): np.array(e.host()[0]) for e in events if isinstance(e, ActivationEvent)}
    results = {e.result.index: e.result for e in events if isinstance(e, ResultEvent)}
    return events, values, results


def test_steps_and_generated_positions_choose_which_forward_passes_are_edited(tiny):
    model, _ = tiny
    vector = np.ones(model.config.hidden_size, np.float32)
    _, plain, _ = run_steps(tiny, [])
    _, edited, _ = run_steps(tiny, [gemmalens.steer(SITE, vector, steps=[2, 3])])
    assert np.array_equal(edited[0, SITE], plain[0, SITE]) and np.array_equal(edited[1, SITE], plain[1, SITE])
    assert not np.allclose(edited[2, SITE], plain[2, SITE])
    _, generated, _ = run_steps(tiny, [gemmalens.steer(SITE, vector, positions="generated")])
    assert np.array_equal(generated[0, SITE], plain[0, SITE])  # the prompt pass holds prompt positions only
    assert not np.allclose(generated[1, SITE], plain[1, SITE])


def test_compiled_decode_steps_edit_as_eager_ones_and_every_batch_is_announced(tiny):
    model, _ = tiny
    edits = [gemmalens.steer(SITE, np.linspace(-3, 3, model.config.hidden_size), prompts=[0, 2]),
             gemmalens.ablate("model.layers.0.self_attn.attn_out", heads=[0], prompts=[1])]
    eager_events, eager, eager_results = run_steps(tiny, edits)
    compiled_events, compiled, compiled_results = run_steps(tiny, edits, compiled=True)
    assert {k: r.tokens for k, r in eager_results.items()} == {k: r.tokens for k, r in compiled_results.items()}
    for key in eager:
        assert np.allclose(eager[key], compiled[key], atol=1e-5), key
    announced = [e for e in compiled_events if isinstance(e, InterventionEvent)]
    assert len(announced) == 1 and compiled_events[0] is announced[0]
    assert [(r["id"], r["rows"]) for r in announced[0].interventions] == [(edits[0].id, [0, 2]), (edits[1].id, [1])]
    assert compiled_results[1].interventions == [edits[1].id] and compiled_results[2].interventions == [edits[0].id]


@pytest.mark.parametrize("item, message", [
    ({"op": "zero", "site": "model.layers.1.resid_outt"}, "nearest: model.layers.1.resid_out"),
    ({"op": "zero", "site": "model.layers.1.self_attn.attn_weights"}, "attention scores and weights cannot"),
    ({"op": "zero", "site": "model.layers.1.resid_out", "heads": [0]}, "'heads' needs a site with heads"),
    ({"op": "zero", "site": "model.layers.1.self_attn.attn_out", "heads": [99]}, "heads [99] outside"),
    ({"op": "add", "site": "model.layers.1.resid_out", "vector": [1.0, 2.0]}, "the site takes"),
    ({"op": "clamp", "site": "model.layers.1.resid_out", "index": 100000, "value": 1.0}, "outside the site's last"),
])
def test_what_the_model_cannot_take_is_refused_before_generating(tiny, item, message):
    model, _ = tiny
    with pytest.raises(ConfigError, match="intervention 0") as error:
        prepare([parse(item)], model.config)
    assert message in str(error.value)


def test_a_patch_source_without_the_site_is_refused_naming_what_it_holds(tiny, tmp_path):
    model, tokenizer = tiny
    gemmalens.batch_generate(model, tokenizer, ["hello"], max_tokens=2, temperature=0,
                             save_activations_dir=tmp_path / "run", capture=["model.layers.0.resid_out"])
    with pytest.raises(ConfigError, match="cannot read the source.*was not captured"):
        prepare([gemmalens.patch(SITE, tmp_path / "run", 0)], model.config)
    with pytest.raises(ConfigError, match="cannot read the source"):
        prepare([gemmalens.patch(SITE, tmp_path / "nowhere", 0)], model.config)
