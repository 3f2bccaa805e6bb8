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
