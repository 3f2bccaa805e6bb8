"""Each sampling step on constructed logits, and seeded sampling independent of the batch."""

import math

import mlx.core as mx
import numpy as np
import pytest
from helpers import tiny_generator

import gemmalens
from gemmalens.errors import ConfigError
from gemmalens.engine.sampling import SamplingParams, gumbel_noise, penalize, sample, step_keys

NOTHING_SEEN = mx.zeros((1, 4), dtype=mx.bool_)


def logits_of(probs):
    return mx.array([[math.log(p) for p in probs]], dtype=mx.float32)


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    out = penalize(mx.array([[2.0, -2.0, 1.0]]), mx.array([[True, True, False]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_greedy_takes_the_argmax_after_the_penalty():
    logits = mx.array([[3.0, 2.0, 1.0, 0.0]])
    tokens, record = sample(logits, mx.array([[True, False, False, False]]), SamplingParams(0, 1.0, None, 2.0), None)
    assert tokens.tolist() == [1]
    assert record["penalized_logits"].tolist() == [[1.5, 2.0, 1.0, 0.0]]


def test_temperature_divides_the_penalized_logits():
    logits = mx.array([[3.0, 2.0, 1.0, 0.0]])
    _, record = sample(logits, NOTHING_SEEN, SamplingParams(0.5, 1.0, None, 1.0), step_keys(0, [0], 0))
    assert record["scaled_logits"].tolist() == [[6.0, 4.0, 2.0, 0.0]]
    expected = np.exp([6.0, 4.0, 2.0, 0.0]) / np.exp([6.0, 4.0, 2.0, 0.0]).sum()
    assert np.allclose(np.array(record["softmax_probs"][0]), expected, rtol=1e-6)


def test_top_k_keeps_exactly_the_k_largest():
    logits = logits_of([0.1, 0.4, 0.2, 0.3])
    _, record = sample(logits, NOTHING_SEEN, SamplingParams(1.0, 1.0, 2, 1.0), step_keys(0, [0], 0))
    assert record["kept"].tolist() == [[False, True, False, True]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    _, record = sample(logits, NOTHING_SEEN, SamplingParams(1.0, 0.75, None, 1.0), step_keys(0, [0], 0))
    assert record["kept"].tolist() == [[True, True, False, False]]
    _, record = sample(logits, NOTHING_SEEN, SamplingParams(1.0, 0.4, None, 1.0), step_keys(0, [0], 0))
    assert record["kept"].tolist() == [[True, False, False, False]]


def test_draw_is_the_argmax_of_logit_plus_the_keyed_noise_over_the_kept_set():
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    params = SamplingParams(1.0, 0.75, None, 1.0)  # kept {0, 1}
    for step in range(20):
        keys = step_keys(7, [0], step)
        noise = np.array(gumbel_noise(mx.array(keys), mx.arange(4)[None]))[0]
        expected = int(np.argmax(np.array(logits[0]) + noise + np.array([0, 0, -np.inf, -np.inf])))
        tokens, record = sample(logits, NOTHING_SEEN, params, keys)
        assert tokens.tolist() == [expected]
        assert record["token_prob"].item() == pytest.approx([0.5, 0.3][expected], rel=1e-6)


def test_draw_frequencies_follow_the_renormalised_kept_distribution():
    logits = mx.broadcast_to(logits_of([0.5, 0.3, 0.15, 0.05]), (4000, 4))
    keys = step_keys(11, range(4000), 0)
    tokens, _ = sample(logits, mx.zeros((4000, 4), dtype=mx.bool_), SamplingParams(1.0, 0.75, None, 1.0), keys)
    counts = np.bincount(np.array(tokens), minlength=4) / 4000
    assert counts[2] == counts[3] == 0
    assert counts[0] == pytest.approx(0.625, abs=0.03)


def test_step_keys_depend_on_seed_prompt_index_and_step_only():
    assert (step_keys(1, [5, 6], 3)[1] == step_keys(1, [6], 3)[0]).all()
    assert not (step_keys(1, [5], 3) == step_keys(1, [5], 4)).all()
    assert not (step_keys(1, [5], 3) == step_keys(2, [5], 3)).all()


def test_top_p_after_top_k_uses_the_distribution_renormalised_over_k():
    logits = logits_of([0.4, 0.3, 0.2, 0.1])
    # over the top 2: 0.571, 0.429; top_p 0.5 then keeps one token (it would keep two over all four)
    _, record = sample(logits, NOTHING_SEEN, SamplingParams(1.0, 0.5, 2, 1.0), step_keys(0, [0], 0))
    assert record["kept"].tolist() == [[True, False, False, False]]


def test_top_p_over_a_flat_distribution_falls_back_to_the_whole_vocabulary():
    logits = mx.zeros((1, 1000))
    _, record = sample(logits, mx.zeros((1, 1000), dtype=mx.bool_), SamplingParams(1.0, 0.8995, None, 1.0), step_keys(0, [0], 0))
    assert int(record["kept"].sum().item()) == 900


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0),
                                 dict(repetition_penalty=0.0)])
def test_invalid_sampling_values_are_refused(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_seeded_sampling_is_identical_across_batch_sizes():
    model, tokenizer = tiny_generator()
    prompts = [f"Prompt number {i} says" + " more" * i for i in range(8)]
    runs = [gemmalens.batch_generate(model, tokenizer, prompts, max_tokens=8, temperature=1.0, top_p=0.95,
                                     seed=1234, batch_size=size) for size in (1, 3, 8)]
    assert [r.tokens for r in runs[0]] == [r.tokens for r in runs[1]] == [r.tokens for r in runs[2]]
    again = gemmalens.batch_generate(model, tokenizer, prompts[3:5], max_tokens=8, temperature=1.0, top_p=0.95, seed=1234)
    assert [r.tokens for r in again] != [r.tokens for r in runs[0][3:5]]  # rows are seeded by their index in the run
    other = gemmalens.batch_generate(model, tokenizer, prompts, max_tokens=8, temperature=1.0, top_p=0.95, seed=99)
    assert [r.tokens for r in other] != [r.tokens for r in runs[0]]
