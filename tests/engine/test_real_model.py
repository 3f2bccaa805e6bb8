"""The embedded Gemma 3 270M (float32) against transformers' model loaded from the same GGUF."""

import numpy as np
import pytest
import torch
from helpers import relative_error

import gemmalens

pytestmark = pytest.mark.real

TEXTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Ünïcödé: 日本語のテキスト, emoji 🤖🚀 and Ελληνικά",
    "tabs\tand   runs of    spaces\n\n\nand newlines",
    "<start_of_turn>user\nliteral special tokens<end_of_turn>\n<bos><eos>",
    "",
]
LONG = " ".join(f"Item {i}: the quick brown fox jumps over the lazy dog." for i in range(60))


def test_tokenization_equals_transformers(real, hf_reference):
    _, tokenizer = real
    _, reference = hf_reference
    for text in TEXTS + [LONG]:
        assert tokenizer.encode(text) == reference(text)["input_ids"], text


def test_long_prompt_is_longer_than_the_sliding_window(real):
    _, tokenizer = real
    assert len(tokenizer.encode(LONG)) > 600


@pytest.mark.parametrize("text", [TEXTS[0], TEXTS[1], LONG])
def test_logits_equal_transformers(real, hf_reference, text):
    model, tokenizer = real
    reference, _ = hf_reference
    ids = tokenizer.encode(text)
    ours, _ = gemmalens.run_with_capture(model, tokenizer, [ids])
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0].numpy()
    assert relative_error(np.array(ours[0]), theirs) < 1e-4


def test_greedy_continuations_equal_transformers(real, hf_reference):
    model, tokenizer = real
    reference, _ = hf_reference
    prompts = [TEXTS[0], TEXTS[1], LONG]
    ours = gemmalens.batch_generate(model, tokenizer, prompts, max_tokens=16, temperature=0,
                                    repetition_penalty=1.0, batch_size=3)
    for prompt, result in zip(prompts, ours):
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            out = reference.generate(ids, max_new_tokens=16, do_sample=False, repetition_penalty=1.0,
                                     eos_token_id=[1, 106], pad_token_id=0)
        theirs = out[0, ids.shape[1]:].tolist()
        assert result.finish_reason == "length" and len(result.tokens) == 16
        assert result.tokens == theirs


def test_left_padded_batch_greedy_tokens_equal_each_prompt_alone(real):
    model, tokenizer = real
    prompts = ["Once upon a time", "The three primary colours are red,", "import numpy as np\nx ="]
    batched = gemmalens.batch_generate(model, tokenizer, prompts, max_tokens=12, temperature=0, batch_size=3)
    for prompt, result in zip(prompts, batched):
        alone = gemmalens.batch_generate(model, tokenizer, [prompt], max_tokens=12, temperature=0)[0]
        assert result.tokens == alone.tokens


def test_logit_lens_equals_transformers_final_norm_and_tied_unembedding_on_each_layer(real, hf_reference):
    model, tokenizer = real
    reference, _ = hf_reference
    ids = tokenizer.encode(TEXTS[0])
    layers = [0, 8, model.config.num_hidden_layers - 1]
    names = [f"model.layers.{i}.logit_lens.{part}" for i in layers for part in ("tokens", "probs")]
    _, lens = gemmalens.run_with_capture(model, tokenizer, [ids], names)
    with torch.no_grad():
        out = reference(torch.tensor([ids]), output_hidden_states=True)
        for i in layers:
            hidden = out.hidden_states[i + 1] if i + 1 < len(out.hidden_states) - 1 else None
            logits = (reference.lm_head(reference.model.norm(hidden)) if hidden is not None else out.logits)[0]
            probs = torch.softmax(logits.double(), -1)
            top = torch.topk(probs, 10, dim=-1)
            assert np.array(lens[f"model.layers.{i}.logit_lens.tokens"])[0].tolist() == top.indices.tolist(), i
            assert np.allclose(np.array(lens[f"model.layers.{i}.logit_lens.probs"])[0], top.values.numpy(),
                               rtol=2e-3, atol=1e-6), i
