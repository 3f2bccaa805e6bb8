"""Chat formatting, stop tokens and left padding."""

import pytest

from gemmalens.engine.loading import embedded_folder
from gemmalens.engine.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(embedded_folder())


def test_chat_template_renders_gemma_turns(tokenizer):
    assert tokenizer.format("Hi there", chat=True) == (
        "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
    )


def test_chat_encoding_has_one_bos_and_turn_tokens(tokenizer):
    ids = tokenizer.encode("Hi", chat=True)
    assert ids == [2, 105, 2364, 107, 10979, 106, 107, 105, 4368, 107]


def test_plain_encoding_starts_with_bos(tokenizer):
    assert tokenizer.encode("Hello world") == [2, 9259, 1902]


def test_stop_tokens_are_eos_and_end_of_turn(tokenizer):
    assert tokenizer.stop_ids == {1, 106}


def test_pad_batch_pads_on_the_left(tokenizer):
    ids, pad = tokenizer.pad_batch([[2, 5, 6], [2]])
    assert ids.tolist() == [[2, 5, 6], [0, 0, 2]] and pad.tolist() == [0, 2]
