"""Captured values against transformers' forward hooks, and decode-step captures against full forwards."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import hf_model, mlx_model, random_weights, relative_error, tiny_config, tiny_generator

import gemmalens
from gemmalens.engine.selection import axes_of, catalogue
from gemmalens.prompts import Prompt

POINTS = ["self_attn.q_proj_out", "mlp.gate_proj_out", "mlp.down_proj_out", "resid_out", "self_attn.attn_weights"]


def hooked_forward(model, ids: list[int], layers) -> dict[str, np.ndarray]:
    """transformers' values at our points for one unpadded sequence, through forward hooks."""
    seen, handles = {}, []

    def keep(name, pick):
        return lambda module, args, out: seen.__setitem__(name, pick(out).detach()[0].float().numpy())

    for i in layers:
        layer = model.model.layers[i]
        p = f"model.layers.{i}."
        handles += [
            layer.self_attn.q_proj.register_forward_hook(keep(p + "self_attn.q_proj_out", lambda o: o)),
            layer.mlp.gate_proj.register_forward_hook(keep(p + "mlp.gate_proj_out", lambda o: o)),
            layer.mlp.down_proj.register_forward_hook(keep(p + "mlp.down_proj_out", lambda o: o)),
            layer.register_forward_hook(keep(p + "resid_out", lambda o: o[0] if isinstance(o, tuple) else o)),
            layer.self_attn.register_forward_hook(keep(p + "self_attn.attn_weights", lambda o: o[1])),
        ]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def assert_rows_match(acts, rows, reference_values, names, tolerance):
    width = max(map(len, rows))
    for b, ids in enumerate(rows):
        pad = width - len(ids)
        assert acts.pad[b] == pad
        expected = reference_values[b]
        for name in names:
            ours = np.array(acts[name][b].astype(mx.float32))
            ours = ours[:, pad:, pad:] if name.endswith("attn_weights") else ours[pad:]
            assert relative_error(ours, expected[name]) < tolerance, (b, name)


@pytest.mark.real
def test_real_model_captures_equal_transformers_hooks_for_a_left_padded_batch(real, hf_reference):
    model, tokenizer = real
    reference, _ = hf_reference
    long_text = " ".join(f"Sentence {i} talks about rivers, mountains and the sea." for i in range(55))
    rows = [tokenizer.encode(t) for t in ("Hello, my name is", "def add(a, b):\n    return", long_text)]
    assert len(rows[2]) > 600
    layers = (0, 5, 17)
    names = [f"model.layers.{i}.{p}" for i in layers for p in POINTS]
    _, acts = gemmalens.run_with_capture(model, tokenizer, rows, names)
    reference.set_attn_implementation("eager")
    try:
        expected = [hooked_forward(reference, ids, layers) for ids in rows]
    finally:
        reference.set_attn_implementation("sdpa")
    assert_rows_match(acts, rows, expected, names, 1e-4)


def test_tiny_captures_equal_transformers_hooks_past_the_window():
    config = tiny_config()
    weights = random_weights(config)
    model, reference = mlx_model(config, weights), hf_model(config, weights)
    rng = np.random.default_rng(0)
    rows = [rng.integers(3, 512, size=n).tolist() for n in (30, 9)]
    names = [f"model.layers.{i}.{p}" for i in range(4) for p in POINTS]
    _, tokenizer = tiny_generator()
    _, acts = gemmalens.run_with_capture(model, tokenizer, rows, names)
    expected = [hooked_forward(reference, ids, range(4)) for ids in rows]
    assert_rows_match(acts, rows, expected, names, 1e-5)


def test_every_catalogued_point_is_captured_and_every_captured_name_is_catalogued():
    """Each point is declared once, beside its code: the catalogue and a forward pass agree on names and ranks."""
    from gemmalens.engine.capture import Capture

    model, tokenizer = tiny_generator()
    points = {n: shape for n, shape, _ in catalogue(model.config) if not n.startswith("generate.")}
    ids, pad = tokenizer.pad_batch([tokenizer.encode("a short prompt"), tokenizer.encode("and another one here")])

    class Everything(Capture):  # records every name the model passes, declared or not
        def __init__(self):
            super().__init__(())

        def __call__(self, name, x):
            self.values[name] = x
            return x

        def heads(self, name, x):
            self.values[name] = x.transpose(0, 2, 1, 3)
            return x

        def wants(self, *names):
            return True

        def attention(self, name, x, slots, total):
            self.values[name] = x

    cap = Everything()
    model(ids, pad, cap=cap)
    assert set(cap.values) == set(points)
    for name, value in cap.values.items():
        assert value.ndim == len(axes_of(points[name])) and value.shape[0] == 2, name


def test_decode_step_values_equal_a_full_forward_at_that_position(tmp_path):
    model, tokenizer = tiny_generator(seed=3)
    prompts = ["The first prompt is somewhat longer than the second", "Short one"]
    names = ["model.layers.*.resid_out", "model.layers.2.mlp.gate_proj_out", "model.layers.1.self_attn.keys_rope"]
    results = gemmalens.batch_generate(model, tokenizer, prompts, max_tokens=12, temperature=0.9, seed=5,
                                       batch_size=2, save_activations_dir=tmp_path, capture=names)
    stored = gemmalens.open_activations(tmp_path)
    for result in results:
        sequence = result.prompt_tokens + result.tokens
        _, full = gemmalens.run_with_capture(model, tokenizer, [sequence], stored.names)
        for name in stored.names:
            positions, values = stored.trajectory(name, result.index)
            assert positions.tolist() == list(range(len(positions))) and len(positions) >= len(result.prompt_tokens)
            expected = np.array(full[name][0])[positions]
            assert relative_error(values, expected) < 1e-5, name


def test_attention_capture_at_decode_steps_equals_a_full_forward(tmp_path):
    model, tokenizer = tiny_generator(seed=4)
    prompt = "A prompt that is longer than the tiny sliding window of eight tokens, to wrap the ring"
    name = "model.layers.0.self_attn.attn_weights"  # a sliding layer
    result = gemmalens.batch_generate(model, tokenizer, [prompt], max_tokens=6, temperature=0,
                                      save_activations_dir=tmp_path, capture=[name])[0]
    steps = gemmalens.open_activations(tmp_path).get(name, [0])[0]
    _, full = gemmalens.run_with_capture(model, tokenizer, [result.prompt_tokens + result.tokens], [name])
    full = np.array(full[name][0])  # (heads, seq, keys)
    for step, (positions, weights) in steps.items():
        if step == 0:
            continue
        q = int(positions[0])
        assert relative_error(weights[:, 0, : q + 1], full[:, q, : q + 1]) < 1e-5


def step_events(model, tokenizer, prompts, patterns, positions="all", **config):
    from gemmalens.engine.events import ActivationEvent
    from gemmalens.engine.generation import GenerationConfig, generate
    from gemmalens.engine.sampling import SamplingParams
    from gemmalens.engine.selection import select

    config = GenerationConfig(sampling=SamplingParams(0, 1, None, 1), batch_size=len(prompts), **config)
    selection = select(model.config, patterns, [], positions=positions)
    records = [Prompt(i, p) for i, p in enumerate(prompts)]
    return [e for e in generate(model, tokenizer, records, config, selection) if isinstance(e, ActivationEvent)]


def test_positions_last_publishes_the_prompts_last_entry_and_the_written_keys():
    model, tokenizer = tiny_generator(seed=6)
    prompts = ["A longer prompt than the other one, by some words", "Short"]
    names = ["model.layers.1.resid_out", "model.layers.0.self_attn.attn_weights"]
    events = [e for e in step_events(model, tokenizer, prompts, names, "last", max_tokens=2) if e.step == 0]
    rows = [tokenizer.encode(p) for p in prompts]
    ids, pad = tokenizer.pad_batch(rows)
    _, full = gemmalens.run_with_capture(model, tokenizer, rows, names)  # the same left-padded batch
    width = ids.shape[1]
    for event in events:
        array, dtype = event.host()
        expected = np.array(full[event.name])
        if event.name.endswith("attn_weights"):  # (rows, heads, seq, keys): the last query over every written key
            assert array.shape == expected[:, :, -1:].shape and array.shape[-1] == width
            assert relative_error(array, expected[:, :, -1:]) < 1e-5
        else:
            assert array.shape == expected[:, -1:].shape
            assert relative_error(array, expected[:, -1:]) < 1e-5
        assert event.slot == width - 1 and event.pads == pad.tolist() and dtype == "float32"


def test_capture_dtype_bfloat16_publishes_float32_values_rounded_to_bfloat16():
    model, tokenizer = tiny_generator(seed=7)
    name = "model.layers.2.mlp.gate_proj_out"
    plain = step_events(model, tokenizer, ["Some prompt"], [name], max_tokens=3)
    halved = step_events(model, tokenizer, ["Some prompt"], [name], max_tokens=3, capture_dtype="bfloat16")
    for full, half in zip(plain, halved):
        wide, wide_dtype = full.host()
        bits, dtype = half.host()
        assert (wide_dtype, dtype) == ("float32", "bfloat16")
        assert bits.tobytes() == np.array(mx.array(wide).astype(mx.bfloat16).view(mx.uint16)).tobytes()


def test_an_unknown_capture_dtype_is_refused_with_the_choices():
    from gemmalens.errors import ConfigError
    from gemmalens.engine.generation import GenerationConfig

    with pytest.raises(ConfigError, match="capture dtype must be one of float32, bfloat16, got 'float16'"):
        GenerationConfig(capture_dtype="float16")
