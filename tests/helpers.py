"""Test helpers: tiny random Gemma 3 models (speed), weights, and transformers references."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

import gemmalens.engine  # noqa: F401  (sets up the fast BLAS before MLX loads)
import mlx.core as mx
from mlx.utils import tree_flatten

from gemmalens.engine.config import Gemma3Config, layer_pattern
from gemmalens.engine.loading import embedded_folder, hf_config_dict
from gemmalens.engine.model import Gemma3

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def tiny_config(**overrides) -> Gemma3Config:
    """A 4-layer Gemma 3 with a window of 8, small enough to test in milliseconds."""
    values = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, vocab_size=512, sliding_window=8,
        query_pre_attn_scalar=32.0, max_position_embeddings=4096, layer_types=layer_pattern(4, 2),
    )
    values.update(overrides)
    return Gemma3Config(**values)


def random_weights(config: Gemma3Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under Hugging Face names (norm weights near 0, as trained ones are)."""
    rng = np.random.default_rng(seed)
    shapes = {k: v.shape for k, v in tree_flatten(Gemma3(config).parameters())}
    out = {}
    for name, shape in shapes.items():
        scale = 0.3 if name.endswith("norm.weight") else 0.5 / np.sqrt(shape[-1])
        out[name] = (rng.standard_normal(shape) * scale).astype(np.float32)
    out["model.embed_tokens.weight"] *= np.float32(np.sqrt(config.hidden_size) / 4)
    return out


def write_hf_folder(folder: Path, config: Gemma3Config, weights: dict[str, np.ndarray], prefix: str = "model.",
                    multimodal: bool = False) -> Path:
    """A Hugging Face-layout folder: config.json, model.safetensors, tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    hf = hf_config_dict(config)
    raw = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": hf} if multimodal else hf
    (folder / "config.json").write_text(json.dumps(raw))
    named = {prefix + k[len("model."):]: mx.array(v) for k, v in weights.items()}
    mx.save_safetensors(str(folder / "model.safetensors"), named)
    copy_tokenizer(folder)
    return folder


def copy_tokenizer(folder: Path) -> None:
    source = embedded_folder()
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)


def mlx_model(config: Gemma3Config, weights: dict[str, np.ndarray], dtype=mx.float32) -> Gemma3:
    model = Gemma3(config)
    model.load_weights([(k, mx.array(v).astype(dtype)) for k, v in weights.items()], strict=True)
    return model


def hf_model(config: Gemma3Config, weights: dict[str, np.ndarray]):
    """transformers' Gemma3ForCausalLM with the same weights (float32, eager attention)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    hf_config = Gemma3TextConfig(**hf_config_dict(config))
    hf_config._attn_implementation = "eager"
    model = Gemma3ForCausalLM(hf_config).eval()
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def relative_error(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tiny_generator(seed: int = 0):
    """A tiny random model with Gemma's full vocabulary, and the real tokenizer: fast generation tests."""
    from gemmalens.engine.tokenizer import load_tokenizer

    config = tiny_config(vocab_size=262144)
    return mlx_model(config, random_weights(config, seed)), load_tokenizer(embedded_folder())


# Running the command line as a user would: a fresh process per command.
ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=None, env=None, timeout=600):
    """``gemmalens ARGS`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "gemmalens.cli.main", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def seed(*args, cwd=None, env=None, timeout=600):
    """The seed's literal command: python run_gemma_refactored.py [flags]."""
    return subprocess.run([sys.executable, str(ROOT / "run_gemma_refactored.py"), *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def load_json(path):
    return json.loads(Path(path).read_text())


def without_timings(results):
    return [{k: v for k, v in r.items() if k != "timings"} for r in results]


class Engine:
    """Builds protocol-v2 messages as an engine would (sequence numbers per topic, counts in run.end): sinks'
    tests feed them to ``Subscriber.handle``."""

    def __init__(self, run: str = "run1", engine: str = "0"):
        from collections import Counter

        self.run, self.engine, self.counts = run, engine, Counter()

    def _message(self, topic: str, kind: str, body=None, **fields):
        from gemmalens import wire

        head = wire.header(topic, kind, self.run, self.engine, self.counts[topic], **fields)
        self.counts[topic] += 1
        return wire.message(topic, head, body)

    def run_start(self, prompts=(), resume: bool = False, spec=None, engines: int = 1):
        return self._message("run.start", "run_start", {
            "run": self.run, "spec": spec or {}, "prompts": [{"index": i, "text": f"prompt {i}", "category": None,
                                                              "subcategory": None} for i in prompts],
            "capture": {}, "engines": engines, "segment": {"resume": resume, "skipped": []}})

    def activation(self, batch, step, name, array, dtype=None, slot=0, pads=None, prompts=None, codec="lz4",
                   axes=None):
        import json

        from gemmalens import wire

        rows = array.shape[0]
        topic = wire.activation_topic(name)
        head = wire.header(topic, "activation", self.run, self.engine, self.counts[topic], batch=batch, step=step,
                           name=name, dtype=dtype or str(array.dtype), shape=list(array.shape),
                           axes=axes or ["batch", "seq"] + ["hidden"] * (array.ndim - 2), codec=codec,
                           nbytes=array.nbytes, slot=slot)
        head.update(prompts=prompts or list(range(batch, batch + rows)), pads=pads or [0] * rows, live=[True] * rows)
        self.counts[topic] += 1
        return [topic.encode(), json.dumps(head).encode(), wire.encode_array(array, codec)]

    def tokens(self, batch, step, prompts, tokens, frames):
        return self._message("tokens", "tokens", {"batch": batch, "step": step, "prompts": list(prompts),
                                                  "tokens": list(tokens), "positions": [step] * len(prompts),
                                                  "frames": frames})

    def result(self, index, tokens=(5,)):
        return self._message("result", "result", {"id": index, "index": index, "prompt": f"prompt {index}",
                                                  "tokens": list(tokens), "text": "x", "finish_reason": "length",
                                                  "prompt_tokens": [2], "category": None, "subcategory": None})

    def batch_end(self, batch, prompts, steps):
        return self._message("batch.end", "batch_end", {"batch": batch, "prompts": list(prompts), "steps": steps})

    def run_end(self, complete: bool = True, reason=None):
        self.counts["run.end"] += 1
        topics = dict(self.counts)
        self.counts["run.end"] -= 1
        return self._message("run.end", "run_end", {"complete": complete, "reason": reason, "topics": topics})
