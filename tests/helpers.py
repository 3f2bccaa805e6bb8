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


def relative_error(a, b, chunk: int = 1 << 18) -> float:
    """||a - b|| / ||b|| in float64, a chunk at a time: whole float64 copies of a long prompt's logits (a GB) took
    a minute here, most of it the kernel handing out fresh pages."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    assert a.shape == b.shape, (a.shape, b.shape)
    difference = norm = 0.0
    for start in range(0, a.size, chunk):
        x, y = a[start:start + chunk].astype(np.float64), b[start:start + chunk].astype(np.float64)
        x -= y
        difference += float(np.dot(x, x))
        norm += float(np.dot(y, y))
    return float(np.sqrt(difference) / np.sqrt(norm))


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


GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
              "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gguf(path: Path, config: Gemma3Config, weights: dict[str, np.ndarray], tokens: list[str]) -> dict:
    """A Gemma 3 GGUF file as llama.cpp writes one (norms with the +1 added; projections Q8_0), with a small
    SentencePiece vocabulary; returns the float32 weights a reader must recover (Q8_0 rounding applied)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name("Tiny Gemma 3 test model")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_sliding_window(config.sliding_window)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    types = [3 if t.startswith("<") and t.endswith(">") and not t.startswith("<0x") else
             6 if t.startswith("<0x") else 1 for t in tokens]  # control, byte, normal
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_pad_token_id(0)
    writer.add_unk_token_id(3)
    expected = {}
    for name, value in weights.items():
        stem = name[len("model."):-len(".weight")]
        if stem == "embed_tokens":
            gguf_name = "token_embd"
        elif stem == "norm":
            gguf_name = "output_norm"
        else:
            _, layer, part = stem.split(".", 2)
            gguf_name = f"blk.{layer}.{GGUF_NAMES[part]}"
        if name.endswith("norm.weight"):
            writer.add_tensor(gguf_name + ".weight", (value + 1).astype(np.float32))
            expected[name] = ((value + 1).astype(np.float32) - np.float32(1)).astype(np.float32)
        else:
            packed = gguf.quants.quantize(value.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name + ".weight", packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            expected[name] = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q8_0).astype(np.float32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def tiny_vocabulary(size: int = 512) -> list[str]:
    """Gemma's special tokens, the 256 byte pieces, and words and pieces a BPE can merge."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    pieces = ["\u2581", "a", "b", "c", "d", "e", "\u2581a", "ab", "\u2581ab", "cd", "abcd", "\u2581abcd", "de"]
    tokens = specials + [f"<0x{i:02X}>" for i in range(256)] + pieces
    return tokens + [f"w{i}" for i in range(size - len(tokens))]


def write_sae(root: Path, folder: str, hook: str, d_in: int, width: int = 48, *, d_out: int | None = None,
              hook_out: str | None = None, kind: str = "sae", skip: bool = False, seed: int = 0,
              exact: bool = False) -> dict:
    """A JumpReLU SAE (or transcoder) in Gemma Scope 2's layout under ``root/folder``: random weights, thresholds
    that let about a third of the features fire on inputs of unit scale; or, ``exact``, one that reconstructs
    every input exactly (features ``relu(x)`` and ``relu(-x)``, width ``2 * d_in``). Returns the numpy weights."""
    rng = np.random.default_rng(seed)
    d_out = d_out or d_in
    if exact:
        eye = np.eye(d_in, dtype=np.float32)
        width = 2 * d_in
        weights = {"w_enc": np.concatenate([eye, -eye], 1), "b_enc": np.zeros(width, np.float32),
                   "w_dec": np.concatenate([eye, -eye], 0), "b_dec": np.zeros(d_in, np.float32),
                   "threshold": np.zeros(width, np.float32)}
    else:
        weights = {"w_enc": rng.standard_normal((d_in, width)).astype(np.float32) / np.sqrt(d_in),
                   "b_enc": rng.standard_normal(width).astype(np.float32) * 0.1,
                   "w_dec": rng.standard_normal((width, d_out)).astype(np.float32) / np.sqrt(width),
                   "b_dec": rng.standard_normal(d_out).astype(np.float32) * 0.1,
                   "threshold": np.abs(rng.standard_normal(width)).astype(np.float32) * 0.5}
    if skip:
        weights["affine_skip_connection"] = rng.standard_normal((d_in, d_out)).astype(np.float32) * 0.05
    path = root / folder
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "width": width, "model_name": "google/gemma-3-270m-pt", "architecture": "jump_relu", "l0": width // 3,
        "affine_connection": skip, "hf_hook_point_in": hook, "hf_hook_point_out": hook_out or hook, "type": kind}))
    mx.save_safetensors(str(path / "params.safetensors"), {k: mx.array(v) for k, v in weights.items()})
    return weights
