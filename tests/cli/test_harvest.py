"""``gemmalens harvest``: a corpus packed into windows (a bos, then the documents' stream, a bos between two), each
window one dataset row, its values those of transformers' forward pass over the same ids."""

import json
import os

import datasets
import numpy as np
from helpers import hf_model, random_weights, relative_error, run_cli, tiny_config

from gemmalens.engine.loading import embedded_folder
from gemmalens.engine.tokenizer import load_tokenizer

DOCUMENTS = ["The quick brown fox jumps over the lazy dog, and the dog does not mind at all.",
             "Sparse autoencoders split activations into features that people can read.",
             "In the spring the river floods the meadow and the herons come back to fish."]


def test_harvest_writes_a_row_per_window_with_transformers_values(tmp_path, tiny_folder):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCUMENTS))
    env_home = {"GEMMALENS_CACHE": str(tmp_path / "cache")}
    done = run_cli("harvest", "--model", tiny_folder, "--corpus", corpus, "--text-field", "body", "--context", 12,
                   "--capture", "model.layers.0.resid_out", "--capture", "model.layers.2.resid_out",  # 3 of 4 run
                   "--dataset", tmp_path / "dataset", "--batch-size", 2,
                   "--output-dir", tmp_path / "ledger", "--progress-every", 0.1, env={**os.environ, **env_home})
    assert done.returncode == 0, done.stderr
    assert "prompt tok/s" in done.stderr and not (tmp_path / "ledger" / "activations").exists()

    tokenizer = load_tokenizer(embedded_folder())
    stream = []
    for document in DOCUMENTS:
        stream += ([tokenizer.bos_id] if stream else []) + tokenizer.backend.encode(document, add_special_tokens=False).ids
    windows = [[tokenizer.bos_id, *stream[i:i + 11]] for i in range(0, len(stream) - 10, 11)]

    dataset = datasets.load_from_disk(str(tmp_path / "dataset"))
    assert dataset.features["model.layers.2.resid_out"].shape == (12, 64) and dataset.num_rows == len(windows)
    rows = dataset.with_format("numpy")[:]
    assert rows["token_ids"].tolist() == windows
    assert rows["prompt_id"][:, 0].tolist() == list(range(len(windows))) and not rows["is_generated"].any()

    import torch

    config = tiny_config(vocab_size=262144)
    reference = hf_model(config, random_weights(config))
    with torch.no_grad():
        hidden = reference(torch.tensor(windows), output_hidden_states=True).hidden_states
    assert "model.layers.1.resid_out" not in dataset.column_names
    for layer in (0, 2):
        assert relative_error(rows[f"model.layers.{layer}.resid_out"], hidden[layer + 1].numpy()) < 1e-5


def test_a_corpus_line_without_text_is_named(tmp_path, tiny_folder):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"title": "no text"}) + "\n")
    done = run_cli("harvest", "--model", tiny_folder, "--corpus", corpus, "--capture", "model.layers.0.resid_out",
                   "--dataset", tmp_path / "d", "--output-dir", tmp_path / "ledger")
    assert done.returncode == 2 and "corpus.jsonl, line 2: no text under 'text'" in done.stderr
    assert "--text-field" in done.stderr and not (tmp_path / "d").exists()
