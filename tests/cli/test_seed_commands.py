"""Every command of the seed's README runs as documented (with a small --max-tokens) and writes its files."""

import json
import os

import mlx.core as mx
import numpy as np
import pytest
from helpers import ROOT, load_json, random_weights, seed, tiny_config, write_hf_folder

pytestmark = pytest.mark.real

OUTPUTS = ("results.json", "prompt_metadata.json", "summary.json")


def assert_outputs(folder, prompts=8):
    for name in OUTPUTS:
        assert (folder / name).exists(), name
    summary = load_json(folder / "summary.json")
    assert summary["complete"] and summary["prompts_done"] == prompts
    results = load_json(folder / "results.json")
    assert [r["id"] for r in results] == list(range(len(results)))
    assert all(r["text"] is not None and r["tokens"] for r in results)
    return summary, results


def test_simple_generation_with_default_prompts(tmp_path):
    out = seed("--max-tokens", 3, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert_outputs(tmp_path / "gemma3_results")


def test_custom_parameters(tmp_path):
    out = seed("--max-tokens", 4, "--temperature", 0.7, "--top-p", 0.9, "--repetition-penalty", 1.1, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    summary, results = assert_outputs(tmp_path / "gemma3_results")
    assert summary["generation"]["sampling"] == {"temperature": 0.7, "top_p": 0.9, "top_k": None,
                                                 "repetition_penalty": 1.1}
    assert all(len(r["tokens"]) <= 4 for r in results)


def test_specific_model_by_hub_id_from_the_local_hub_cache(tmp_path):
    repo = tmp_path / "hub" / "models--mlx-community--gemma-3-1b-it-qat-4bit"
    snapshot = repo / "snapshots" / ("a" * 40)
    config = tiny_config(vocab_size=262144)
    weights = random_weights(config)
    folder = write_hf_folder(snapshot, config, weights)
    stored = {}
    for name, value in mx.load(str(folder / "model.safetensors")).items():  # mlx-community layout, 4-bit
        if value.ndim == 2:
            q, scales, biases = mx.quantize(value, group_size=32, bits=4)
            module = name[: -len(".weight")]
            stored.update({name: q, f"{module}.scales": scales, f"{module}.biases": biases})
        else:
            stored[name] = value
    mx.save_safetensors(str(folder / "model.safetensors"), stored)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "quantization": {"group_size": 32, "bits": 4}}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = seed("--model", "mlx-community/gemma-3-1b-it-qat-4bit", "--max-tokens", 3, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    summary, _ = assert_outputs(tmp_path / "gemma3_results")
    assert summary["model"]["reference"] == "mlx-community/gemma-3-1b-it-qat-4bit"


def test_activation_capture_into_a_chosen_folder(tmp_path):
    out = seed("--save-activations", "--activations-dir", "./my_activations", "--max-tokens", 3,
               "--capture", "model.layers.*.resid_out", "--capture", "generate.*.sample.*", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert_outputs(tmp_path / "gemma3_results")
    files = sorted((tmp_path / "my_activations").glob("activations_step_*.npz"))
    assert len(files) == 2 * 3  # two batches of four prompts, three steps
    with np.load(files[0]) as data:
        assert {"prompts", "tokens", "model.layers.17.resid_out", "generate.step_0.sample.softmax_probs"} <= set(data.files)


def test_uncompressed_activations_capture_every_point_by_default(tmp_path):
    prompts = tmp_path / "two.json"
    prompts.write_text(json.dumps(["Hello there", "The sky is"]))
    out = seed("--save-activations", "--no-compress-activations", "--max-tokens", 2, "--prompts-file", prompts,
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert_outputs(tmp_path / "gemma3_results", prompts=2)
    step0 = tmp_path / "gemma3_results" / "activations" / "activations_step_0_batch_0.npz"
    import zipfile

    assert all(i.compress_type == zipfile.ZIP_STORED for i in zipfile.ZipFile(step0).infolist())
    with np.load(step0) as data:
        for name in ("model.embed_tokens_out", "model.layers.0.self_attn.queries_reshaped",
                     "model.layers.0.mlp.gate_proj_out", "generate.step_0.sample.softmax_probs",
                     "model.layers.5.self_attn.attn_weights"):
            assert name in data.files


def test_structured_prompts_workflow(tmp_path):
    assert seed("--create-sample-prompts", "prompts.json", cwd=tmp_path).returncode == 0
    sample = load_json(tmp_path / "prompts.json")
    assert len(sample) >= 3 and all(isinstance(v, dict) for v in sample.values())
    out = seed("--prompts-file", "prompts.json", "--batch-size", 2, "--verbose", "--max-tokens", 3, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "->" in out.stderr  # --verbose prints each result
    _, results = assert_outputs(tmp_path / "gemma3_results")
    metadata = load_json(tmp_path / "gemma3_results" / "prompt_metadata.json")
    assert {p["category"] for p in metadata["prompts"]} == set(sample)
    assert all(r["category"] in sample for r in results)


def test_process_by_group(tmp_path):
    seed("--create-sample-prompts", "prompts.json", cwd=tmp_path)
    out = seed("--prompts-file", "prompts.json", "--process-by-group", "--output-dir", "./results",
               "--max-tokens", 2, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for category, subs in load_json(tmp_path / "prompts.json").items():
        count = sum(len(v) for v in subs.values())
        summary = load_json(tmp_path / "results" / category / "summary.json")
        assert summary["complete"] and summary["per_category"] == {category: count}


def test_chat_mode(tmp_path):
    seed("--create-sample-prompts", "prompts.json", cwd=tmp_path)
    out = seed("--chat-mode", "--prompts-file", "prompts.json", "--max-tokens", 2, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    _, results = assert_outputs(tmp_path / "gemma3_results")
    assert all(r["formatted_prompt"].startswith("<bos><start_of_turn>user\n") for r in results)
    assert all(r["prompt_tokens"].count(2) == 1 for r in results)


def test_example_workflow(tmp_path):
    assert seed("--create-sample-prompts", "my_prompts.json", cwd=tmp_path).returncode == 0
    out = seed("--prompts-file", "my_prompts.json", "--save-activations", "--activations-dir", "./analysis",
               "--output-dir", "./results", "--verbose", "--seed", 42, "--max-tokens", 2,
               "--capture", "model.layers.*.resid_out", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    summary, results = assert_outputs(tmp_path / "results")
    assert summary["generation"]["seed"] == 42 and all(r["seed"] == 42 for r in results)
    import gemmalens

    stored = gemmalens.open_activations(tmp_path / "analysis")
    assert stored.prompts == list(range(8))
    for r in results:
        table = stored.tokens[r["id"]]
        assert table[: len(r["tokens"])] == r["tokens"]
        assert table[len(r["tokens"]):] == ([] if r["finish_reason"] == "length" else table[-1:])


def test_seed_python_api_imports():
    script = ("from gemma_refactored.main import load\nfrom gemma_refactored.generation import batch_generate\n"
              "print(load.__module__, batch_generate.__module__)")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "gemmalens" in out.stdout
