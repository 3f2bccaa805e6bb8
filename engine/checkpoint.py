"""Reading weights: Hugging Face / mlx-community safetensors folders and GGUF files.

Everything is returned under Hugging Face's text-decoder names
(``model.layers.N.self_attn.q_proj.weight``, ...), the names the model's
parameters carry.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

from gemmalens.errors import CheckpointError

from .config import Gemma3Config, config_from_gguf

# Text weights of the multimodal checkpoints, as the Hub files and newer transformers name them.
_TEXT_PREFIXES = ("language_model.model.", "model.language_model.")
_SKIPPED = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector|vision_model)\.|^lm_head\.weight$")

_GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def text_weight_name(name: str) -> str | None:
    """Maps a checkpoint tensor name to the decoder's name; None for tensors to skip."""
    if _SKIPPED.search(name):
        return None
    for prefix in _TEXT_PREFIXES:
        if name.startswith(prefix):
            return "model." + name[len(prefix) :]
    if name.startswith(("language_model.lm_head", "model.language_model.lm_head")):
        return None
    return name


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as error:
            raise CheckpointError(f"{index}: not a valid safetensors index ({error}); re-download the checkpoint") from None
        files = [folder / shard for shard in shards]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights found; expected model.safetensors or a sharded index")
    return files


def read_safetensors(folder: Path) -> dict[str, mx.array]:
    """All text-decoder tensors of a folder, under decoder names."""
    weights: dict[str, mx.array] = {}
    for file in _weight_files(folder):
        try:
            tensors = mx.load(str(file))
        except Exception as error:  # mlx raises RuntimeError/ValueError with its own text
            raise CheckpointError(
                f"{file}: cannot read safetensors ({error}); the file is corrupt or truncated, download it again"
            ) from None
        for name, value in tensors.items():
            mapped = text_weight_name(name)
            if mapped is not None:
                weights[mapped] = value
    return weights


def gguf_metadata(reader) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.split(".")[-1] in ("tokens", "scores", "token_type", "merges"):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # fields the gguf package cannot render are not needed
            continue
    return meta


def open_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable GGUF file ({error}); the file is corrupt or truncated") from None


def read_gguf(path: Path) -> tuple[Gemma3Config, dict[str, np.ndarray], GGUFVocabulary]:
    """Dequantizes a Gemma 3 GGUF file into float32 arrays under decoder names; returns its config, the arrays
    and its vocabulary.

    GGUF stores every RMSNorm weight with the +1 already added; it is removed
    here so the weights mean what Hugging Face's do.
    """
    import gguf

    reader = open_gguf(path)
    meta = gguf_metadata(reader)
    if meta.get("general.architecture") != "gemma3":
        raise CheckpointError(
            f"{path}: GGUF architecture is {meta.get('general.architecture')!r}, expected 'gemma3'"
        )
    weights: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = _gguf_to_hf(tensor.name)
        if name is None:
            raise CheckpointError(f"{path}: unexpected tensor {tensor.name!r} in a Gemma 3 GGUF file")
        try:
            value = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        except Exception as error:
            raise CheckpointError(f"{path}: cannot dequantize {tensor.name} ({tensor.tensor_type.name}): {error}") from None
        if name.endswith("norm.weight"):
            value = value - np.float32(1.0)
        weights[name] = value
    if "model.embed_tokens.weight" not in weights:
        raise CheckpointError(f"{path}: no token_embd.weight tensor; not a complete Gemma 3 GGUF file")
    config = config_from_gguf(meta, weights["model.embed_tokens.weight"].shape[0])
    return config, weights, _vocabulary(reader, path)


class GGUFVocabulary(NamedTuple):
    """A GGUF file's tokenizer: its pieces, their types (1 normal, 3 control, 4 user-defined...) and general.name."""

    tokens: list[str]
    token_types: list[int]
    name: str | None


def _vocabulary(reader, path: Path) -> GGUFVocabulary:
    fields = reader.fields
    if fields.get("tokenizer.ggml.model") is None or fields["tokenizer.ggml.model"].contents() != "llama":
        raise CheckpointError(f"{path}: no SentencePiece vocabulary (tokenizer.ggml.model 'llama'); not a Gemma GGUF")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in fields else []
    name = fields["general.name"].contents() if "general.name" in fields else None
    return GGUFVocabulary(list(tokens), [int(t) for t in types], name)


def _gguf_to_hf(name: str) -> str | None:
    stem, _, kind = name.rpartition(".")
    if kind != "weight":
        return None
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if match:
        part = _GGUF_NAMES.get(match.group(2))
        return f"model.layers.{match.group(1)}.{part}.weight" if part else None
    part = _GGUF_NAMES.get(stem)
    return f"{part}.weight" if part else None
