"""Interventions on the embedded Gemma 3 270M against transformers' model with forward hooks doing the same edit."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import relative_error

import gemmalens

pytestmark = pytest.mark.real

PROMPT = "The capital of France is"
LAYER = 6
GREEDY = {"temperature": 0, "repetition_penalty": 1.0}


def steering_vector(size: int) -> np.ndarray:
    return np.random.default_rng(7).standard_normal(size).astype(np.float32) * 20


def their_greedy(reference, ids, tokens=16):
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False, repetition_penalty=1.0,
                                 eos_token_id=[1, 106], pad_token_id=0)
    return out[0, len(ids):].tolist()


def their_logits(reference, ids):
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0].numpy()


def test_add_at_a_layers_output_equals_a_hook_on_transformers_decoder_layer(real, hf_reference):
    model, tokenizer = real
    reference, _ = hf_reference
    vector = steering_vector(model.config.hidden_size)
    steer = gemmalens.steer(f"model.layers.{LAYER}.resid_out", vector, scale=0.5)
    ids = tokenizer.encode(PROMPT)
    hook = reference.model.layers[LAYER].register_forward_hook(
        lambda module, args, output: output + 0.5 * torch.from_numpy(vector))
    try:
        theirs, their_tokens = their_logits(reference, ids), their_greedy(reference, ids)
    finally:
        hook.remove()
    ours, _ = gemmalens.run_with_capture(model, tokenizer, [ids], interventions=[steer])
    assert relative_error(np.array(ours[0]), theirs) < 1e-4
    plain = gemmalens.batch_generate(model, tokenizer, [PROMPT], max_tokens=16, **GREEDY)[0]
    steered = gemmalens.batch_generate(model, tokenizer, [PROMPT], max_tokens=16, interventions=[steer], **GREEDY)[0]
    assert steered.tokens == their_tokens and steered.tokens != plain.tokens  # the edit changed the text
    assert steered.interventions == [steer.id] and plain.interventions == []


def test_zeroing_heads_at_attn_out_equals_zeroing_them_at_transformers_o_proj_input(real, hf_reference):
    model, tokenizer = real
    reference, _ = hf_reference
    heads, D = [0, 2], model.config.head_dim
    ids = tokenizer.encode(PROMPT)

    def zero_heads(module, args):
        x = args[0].clone()
        for h in heads:
            x[..., h * D:(h + 1) * D] = 0
        return (x,)

    hooks = [reference.model.layers[i].self_attn.o_proj.register_forward_pre_hook(zero_heads) for i in (3, 4)]
    try:
        theirs, their_tokens = their_logits(reference, ids), their_greedy(reference, ids)
    finally:
        for hook in hooks:
            hook.remove()
    ablations = [gemmalens.ablate(f"model.layers.{i}.self_attn.attn_out", heads=heads) for i in (3, 4)]
    ours, captured = gemmalens.run_with_capture(model, tokenizer, [ids], ["model.layers.3.self_attn.attn_out"],
                                                interventions=ablations)
    assert relative_error(np.array(ours[0]), theirs) < 1e-4
    out = np.array(captured["model.layers.3.self_attn.attn_out"])[0]  # captured after the edit
    assert not out[:, :D].any() and not out[:, 2 * D:3 * D].any() and out[:, D:2 * D].any()
    ablated = gemmalens.batch_generate(model, tokenizer, [PROMPT], max_tokens=16, interventions=ablations, **GREEDY)
    assert ablated[0].tokens == their_tokens


def test_set_at_chosen_positions_equals_a_hook_writing_them(real, hf_reference):
    model, tokenizer = real
    reference, _ = hf_reference
    value = steering_vector(model.config.hidden_size)
    ids = tokenizer.encode(PROMPT)

    def write(module, args, output):
        output = output.clone()
        output[:, [1, 3]] = torch.from_numpy(value)
        return output

    hook = reference.model.layers[LAYER].register_forward_hook(write)
    try:
        theirs = their_logits(reference, ids)
    finally:
        hook.remove()
    edit = gemmalens.set_value(f"model.layers.{LAYER}.resid_out", value, positions=[1, 3])
    ours, _ = gemmalens.run_with_capture(model, tokenizer, [ids], interventions=[edit])
    assert relative_error(np.array(ours[0]), theirs) < 1e-4


def test_patching_every_position_of_a_layer_from_a_run_reproduces_its_logits_exactly(real, tmp_path):
    model, tokenizer = real
    site = "model.layers.5.resid_out"
    steer = gemmalens.steer("model.layers.2.resid_out", steering_vector(model.config.hidden_size), scale=0.3)
    gemmalens.batch_generate(model, tokenizer, [PROMPT], max_tokens=8, interventions=[steer], **GREEDY,
                             save_activations_dir=tmp_path / "source", capture=[site, "model.logits"])
    patched = gemmalens.batch_generate(model, tokenizer, [PROMPT], max_tokens=8, **GREEDY,
                                       interventions=[gemmalens.patch(site, tmp_path / "source", 0)],
                                       save_activations_dir=tmp_path / "patched", capture=[site, "model.logits"])
    source, target = gemmalens.open_activations(tmp_path / "source"), gemmalens.open_activations(tmp_path / "patched")
    for name in (site, "model.logits"):
        assert np.array_equal(source.trajectory(name, 0)[1], target.trajectory(name, 0)[1]), name
    assert patched[0].tokens == source.tokens[0]


def test_four_rows_with_four_interventions_equal_four_single_runs(real):
    model, tokenizer = real
    prompts = ["Once upon a time", "The three primary colours are red,", "import numpy as np\nx =", PROMPT]
    vector = steering_vector(model.config.hidden_size)
    edits = [gemmalens.steer(f"model.layers.{LAYER}.resid_out", vector, scale=0.5, prompts=[0]),
             gemmalens.ablate("model.layers.4.self_attn.attn_out", heads=[1], prompts=[1]),
             gemmalens.clamp("model.layers.3.mlp.hidden", index=11, value=25.0, prompts=[2]),
             gemmalens.steer(f"model.layers.{LAYER}.resid_out", -vector, scale=0.5, prompts=[3],
                             positions="generated")]
    batched = gemmalens.batch_generate(model, tokenizer, prompts, max_tokens=10, batch_size=4, interventions=edits,
                                       **GREEDY)
    for row, (prompt, edit) in enumerate(zip(prompts, edits)):
        alone = gemmalens.batch_generate(model, tokenizer, [prompt], max_tokens=10, **GREEDY,
                                         interventions=[replace(edit, prompts=(0,))])[0]
        assert batched[row].tokens == alone.tokens, row
        assert batched[row].interventions == [edit.id]


def test_the_cached_decode_path_equals_a_full_forward_pass_with_the_same_edit(real, tmp_path):
    model, tokenizer = real
    steer = gemmalens.steer(f"model.layers.{LAYER}.resid_out", steering_vector(model.config.hidden_size), scale=0.4)
    result = gemmalens.batch_generate(model, tokenizer, [PROMPT], max_tokens=8, interventions=[steer], **GREEDY,
                                      save_activations_dir=tmp_path / "acts", capture=["model.logits"])[0]
    positions, stepwise = gemmalens.open_activations(tmp_path / "acts").trajectory("model.logits", 0)
    sequence = result.prompt_tokens + result.tokens
    full, _ = gemmalens.run_with_capture(model, tokenizer, [sequence[:-1]], interventions=[steer])
    full = np.array(full[0])[positions]
    assert relative_error(stepwise.reshape(full.shape), full) < 1e-5
    assert full.argmax(-1).tolist() == result.tokens
