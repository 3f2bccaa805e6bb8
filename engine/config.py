"""The Gemma 3 text decoder's configuration, from any checkpoint format."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from gemmalens.errors import ConfigError

SLIDING = "sliding_attention"
GLOBAL = "full_attention"


@dataclass(frozen=True)
class Gemma3Config:
    """Shapes and constants of one Gemma 3 text decoder.

    Defaults are transformers' ``Gemma3TextConfig`` defaults, so the sparse
    ``text_config`` of the multimodal 4b/12b/27b checkpoints reads correctly.
    """

    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    vocab_size: int = 262208
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # global (full-attention) layers
    rope_local_base_freq: float = 10_000.0  # sliding layers, never scaled
    rope_scaling_factor: float = 1.0  # linear scaling of global-layer positions
    query_pre_attn_scalar: float = 256.0
    sliding_window: int = 4096
    layer_types: tuple[str, ...] = field(default=())
    max_position_embeddings: int = 131072

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", layer_pattern(self.num_hidden_layers, 6))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        _validate(self)

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layer_types"] = list(self.layer_types)
        return out


def layer_pattern(num_layers: int, sliding_window_pattern: int) -> tuple[str, ...]:
    """Layer i is global when ``(i + 1) % pattern == 0``, sliding otherwise."""
    return tuple(GLOBAL if (i + 1) % sliding_window_pattern == 0 else SLIDING for i in range(num_layers))


_FIELDS = {f.name for f in dataclasses.fields(Gemma3Config)}
OVERRIDE_KEYS = sorted(_FIELDS | {"sliding_window_pattern"})


def _validate(config: Gemma3Config) -> None:
    positive = [
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size", "sliding_window", "max_position_embeddings",
    ]
    for name in positive:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"model config: {name} must be a positive integer, got {value!r}")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ConfigError(
            f"model config: num_attention_heads ({config.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({config.num_key_value_heads})"
        )
    if config.head_dim % 2:
        raise ConfigError(f"model config: head_dim must be even for rotary embeddings, got {config.head_dim}")
    if len(config.layer_types) != config.num_hidden_layers:
        raise ConfigError(
            f"model config: layer_types lists {len(config.layer_types)} layers but num_hidden_layers is "
            f"{config.num_hidden_layers}"
        )
    unknown = sorted(set(config.layer_types) - {SLIDING, GLOBAL})
    if unknown:
        raise ConfigError(f"model config: unknown layer types {unknown}; expected {SLIDING!r} or {GLOBAL!r}")
    for name in ("rms_norm_eps", "rope_theta", "rope_local_base_freq", "rope_scaling_factor", "query_pre_attn_scalar"):
        if not float(getattr(config, name)) > 0:
            raise ConfigError(f"model config: {name} must be positive, got {getattr(config, name)!r}")


def _linear_factor(params: Mapping[str, Any] | None, where: str) -> float:
    if not params:
        return 1.0
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return 1.0
    if kind == "linear":
        return float(params["factor"])
    raise ConfigError(f"{where}: RoPE type {kind!r} is not used by Gemma 3; expected 'default' or 'linear'")


def config_from_hf(raw: Mapping[str, Any], where: str = "config.json") -> Gemma3Config:
    """Reads a Hugging Face / mlx-community ``config.json`` (text or multimodal).

    Unknown keys are ignored, as hub configs carry many that do not concern the
    text decoder.
    """
    text = dict(raw.get("text_config") or raw)
    values = {k: text[k] for k in _FIELDS if k in text and k not in ("rope_scaling_factor", "layer_types")}
    rope = text.get("rope_parameters")
    if isinstance(rope, Mapping) and (GLOBAL in rope or SLIDING in rope):
        full, local = rope.get(GLOBAL) or {}, rope.get(SLIDING) or {}
        if "rope_theta" in full:
            values["rope_theta"] = full["rope_theta"]
        if "rope_theta" in local:
            values["rope_local_base_freq"] = local["rope_theta"]
        values["rope_scaling_factor"] = _linear_factor(full, where)
        if _linear_factor(local, where) != 1.0:
            raise ConfigError(f"{where}: Gemma 3 never scales RoPE on sliding layers")
    else:
        scaling = text.get("rope_scaling") or (rope if isinstance(rope, Mapping) else None)
        values["rope_scaling_factor"] = _linear_factor(scaling, where)
        if isinstance(rope, Mapping) and "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
    if text.get("layer_types"):
        values["layer_types"] = tuple(text["layer_types"])
    else:
        layers = int(text.get("num_hidden_layers", Gemma3Config.num_hidden_layers))
        values["layer_types"] = layer_pattern(layers, int(text.get("sliding_window_pattern", 6)))
    for name in ("rope_theta", "rope_local_base_freq", "query_pre_attn_scalar", "rms_norm_eps"):
        if name in values:
            values[name] = float(values[name])
    try:
        return Gemma3Config(**values)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def config_from_gguf(metadata: Mapping[str, Any], vocab_rows: int) -> Gemma3Config:
    """Builds the config from a GGUF file's ``gemma3.*`` metadata.

    GGUF omits the layer pattern, the local RoPE base and the query scale: the
    Gemma 3 constants stand in (27B, the only size with head_dim 128, scales by
    hidden / heads = 168, as llama.cpp does).
    """
    def key(name, default=None):
        return metadata.get(f"gemma3.{name}", default)

    layers = int(key("block_count"))
    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    factor = 1.0
    if key("rope.scaling.type") == "linear":
        factor = float(key("rope.scaling.factor"))
    return Gemma3Config(
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        vocab_size=vocab_rows,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(key("rope.freq_base", 1_000_000.0)),
        rope_scaling_factor=factor,
        query_pre_attn_scalar=float(hidden // heads if head_dim == 128 else head_dim),
        sliding_window=int(key("attention.sliding_window", 512)),
        layer_types=layer_pattern(layers, 6),
        max_position_embeddings=int(key("context_length", 32768)),
    )


def apply_overrides(config: Gemma3Config, overrides: Mapping[str, Any] | None) -> Gemma3Config:
    """Applies user ``model_config`` overrides; unknown keys are errors naming them.

    ``sliding_window_pattern`` (the seed's key) rebuilds ``layer_types``.
    """
    if not overrides:
        return config
    unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if unknown:
        raise ConfigError(
            f"model_config: unknown key(s) {', '.join(map(repr, unknown))}; valid keys are {', '.join(OVERRIDE_KEYS)}"
        )
    values = dict(overrides)
    pattern = values.pop("sliding_window_pattern", None)
    if pattern is not None:
        if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern < 1:
            raise ConfigError(f"model_config: sliding_window_pattern must be a positive integer, got {pattern!r}")
        layers = int(values.get("num_hidden_layers", config.num_hidden_layers))
        values["layer_types"] = layer_pattern(layers, pattern)
    try:
        return dataclasses.replace(config, **values)
    except (ConfigError, TypeError) as error:
        raise ConfigError(f"model_config: {error}") from None
