"""Every capture point with its shape and meaning, and the selection of points and positions.

A selection is fixed before the run: include/exclude glob patterns, an
optional layer range, and the positions kept (``all``, ``prompt``,
``generated``, ``last``). A pattern that matches nothing is an error that
lists the nearest names.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass

from .config import Gemma3Config
from .errors import SelectionError

POSITIONS = ("all", "prompt", "generated", "last")

# (suffix, shape, meaning); shapes use B batch, S sequence, E hidden, F intermediate,
# H heads, G kv heads, D head_dim, K keys (absolute slots), V vocab.
MODEL_POINTS = [
    ("model.embed_tokens_out", "B,S,E", "token embeddings E[ids]"),
    ("model.embed_scaled", "B,S,E", "embeddings times sqrt(hidden_size): the residual stream's start"),
]
LAYER_POINTS = [
    ("input_layernorm_in", "B,S,E", "residual stream entering the layer"),
    ("input_layernorm_out", "B,S,E", "RMSNorm before attention"),
    ("self_attn.q_proj_out", "B,S,H*D", "query projection"),
    ("self_attn.k_proj_out", "B,S,G*D", "key projection"),
    ("self_attn.v_proj_out", "B,S,G*D", "value projection"),
    ("self_attn.queries_reshaped", "B,S,H,D", "queries split into heads"),
    ("self_attn.keys_reshaped", "B,S,G,D", "keys split into kv heads"),
    ("self_attn.values_reshaped", "B,S,G,D", "values split into kv heads"),
    ("self_attn.q_norm_out", "B,S,H,D", "queries after the per-head RMSNorm"),
    ("self_attn.k_norm_out", "B,S,G,D", "keys after the per-head RMSNorm"),
    ("self_attn.queries_rope", "B,S,H,D", "queries after rotary embedding"),
    ("self_attn.keys_rope", "B,S,G,D", "keys after rotary embedding"),
    ("self_attn.attn_scores", "B,H,S,K", "scaled, masked (-inf), pre-softmax scores over absolute key slots"),
    ("self_attn.attn_weights", "B,H,S,K", "softmax of the scores: what each query reads (0 where unseen)"),
    ("self_attn.attn_out", "B,S,H*D", "heads merged, before o_proj"),
    ("self_attn.o_proj_out", "B,S,E", "attention output projection"),
    ("post_attention_layernorm_out", "B,S,E", "RMSNorm after attention"),
    ("resid_mid", "B,S,E", "residual stream after the attention block"),
    ("pre_feedforward_layernorm_out", "B,S,E", "RMSNorm before the MLP"),
    ("mlp.gate_proj_out", "B,S,F", "gate projection"),
    ("mlp.up_proj_out", "B,S,F", "up projection"),
    ("mlp.act_out", "B,S,F", "gelu_tanh(gate)"),
    ("mlp.hidden", "B,S,F", "gelu_tanh(gate) * up"),
    ("mlp.down_proj_out", "B,S,E", "down projection"),
    ("post_feedforward_layernorm_out", "B,S,E", "RMSNorm after the MLP"),
    ("resid_out", "B,S,E", "residual stream leaving the layer"),
]
HEAD_POINTS = [
    ("model.norm_out", "B,S,E", "final RMSNorm"),
    ("model.logits", "B,S,V", "logits (generation computes them for the last position only)"),
]
SAMPLE_POINTS = [
    ("logits", "B,1,V", "float32 logits the step samples from"),
    ("penalized_logits", "B,1,V", "after the repetition penalty"),
    ("scaled_logits", "B,1,V", "after temperature"),
    ("softmax_probs", "B,1,V", "softmax of the scaled logits"),
    ("kept", "B,1,V", "bool: the top-k / top-p set the token is drawn from"),
    ("token", "B,1", "the chosen token id"),
    ("token_prob", "B,1", "the chosen token's probability in softmax_probs"),
]


def catalogue(config: Gemma3Config) -> list[tuple[str, str, str]]:
    """(name, shape, meaning) of every model point; sampling points use ``step_{k}``."""
    out = list(MODEL_POINTS)
    for i in range(config.num_hidden_layers):
        out += [(f"model.layers.{i}.{suffix}", shape, meaning) for suffix, shape, meaning in LAYER_POINTS]
    out += HEAD_POINTS
    out += [(f"generate.step_{{k}}.sample.{suffix}", shape, meaning) for suffix, shape, meaning in SAMPLE_POINTS]
    return out


def is_attention(name: str) -> bool:
    """Attention scores and weights are laid out ``[batch, heads, seq, keys]``, not ``[batch, seq, ...]``."""
    return name.endswith(("attn_scores", "attn_weights"))


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else None


def parse_layers(spec: str | None, num_layers: int) -> set[int] | None:
    """``"0-5,17"`` -> {0..5, 17}; None keeps every layer."""
    if spec is None or spec == "":
        return None
    layers: set[int] = set()
    try:
        for part in str(spec).split(","):
            low, _, high = part.strip().partition("-")
            layers.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise SelectionError(f"layers {spec!r}: expected integers and ranges such as '0-5,17'") from None
    out_of_range = sorted(i for i in layers if not 0 <= i < num_layers)
    if out_of_range:
        raise SelectionError(f"layers {spec!r}: {out_of_range} outside 0-{num_layers - 1}")
    return layers


@dataclass(frozen=True)
class Selection:
    """Which points are captured (model names, and sampling suffixes per step) and at which positions."""

    model_names: frozenset[str]
    sample_patterns: tuple[str, ...]
    exclude: tuple[str, ...]
    positions: str

    def __bool__(self) -> bool:
        return bool(self.model_names or self.sample_patterns)

    def to_dict(self) -> dict:
        """The selection as ``run.start`` carries it (``from_dict`` reads it back)."""
        return {"names": sorted(self.model_names), "sample_patterns": list(self.sample_patterns),
                "exclude": list(self.exclude), "positions": self.positions}

    @classmethod
    def from_dict(cls, body: dict) -> "Selection":
        return cls(frozenset(body.get("names", [])), tuple(body.get("sample_patterns", [])),
                   tuple(body.get("exclude", [])), body.get("positions", "all"))

    def names_for_step(self, step: int) -> set[str]:
        """Concrete names to capture at one step (model points plus that step's sampling points)."""
        names = set(self.model_names)
        for suffix, _, _ in SAMPLE_POINTS:
            name = f"generate.step_{step}.sample.{suffix}"
            wanted = any(fnmatch.fnmatchcase(name, p) for p in self.sample_patterns)
            if wanted and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
                names.add(name)
        if self.positions == "prompt" and step > 0:
            return set()
        if self.positions == "generated" and step == 0:
            return {n for n in names if n.startswith("generate.")}
        return names


NO_SELECTION = Selection(frozenset(), (), (), "all")


def select(
    config: Gemma3Config,
    include: list[str] | tuple[str, ...] = (),
    exclude: list[str] | tuple[str, ...] = (),
    layers: str | None = None,
    positions: str = "all",
) -> Selection:
    """Resolves patterns against the model's points; errors name the pattern and near names."""
    if positions not in POSITIONS:
        raise SelectionError(f"positions {positions!r}: expected one of {', '.join(POSITIONS)}")
    if not include:
        return NO_SELECTION
    model_points = [name for name, _, _ in catalogue(config) if not name.startswith("generate.")]
    sample_templates = [f"generate.step_{{k}}.sample.{suffix}" for suffix, _, _ in SAMPLE_POINTS]
    example_steps = [t.replace("{k}", "0") for t in sample_templates]
    chosen: set[str] = set()
    sample_patterns: list[str] = []
    for pattern in include:
        hits = [n for n in model_points if fnmatch.fnmatchcase(n, pattern)]
        sample_hit = any(fnmatch.fnmatchcase(example, pattern) for example in example_steps) or _matches_some_step(
            pattern, sample_templates
        )
        if not hits and not sample_hit:
            near = difflib.get_close_matches(pattern, model_points + example_steps, n=5, cutoff=0.4)
            raise SelectionError(
                f"capture pattern {pattern!r} matches no capture point"
                + (f"; nearest names: {', '.join(near)}" if near else "")
                + " (`gemmalens names` lists them all)"
            )
        chosen.update(hits)
        if sample_hit:
            sample_patterns.append(pattern)
    chosen = {n for n in chosen if not any(fnmatch.fnmatchcase(n, p) for p in exclude)}
    wanted_layers = parse_layers(layers, config.num_hidden_layers)
    if wanted_layers is not None:
        chosen = {n for n in chosen if _layer_of(n) is None or _layer_of(n) in wanted_layers}
    return Selection(frozenset(chosen), tuple(sample_patterns), tuple(exclude), positions)


def _matches_some_step(pattern: str, templates: list[str]) -> bool:
    """True when ``pattern`` names a concrete step, e.g. ``generate.step_41.sample.token``."""
    parts = pattern.split(".")
    if len(parts) >= 2 and parts[0] == "generate" and parts[1].startswith("step_") and parts[1][5:].isdigit():
        step = int(parts[1][5:])
        return any(fnmatch.fnmatchcase(t.replace("{k}", str(step)), pattern) for t in templates)
    return False


def estimate_bytes(config: Gemma3Config, selection: Selection, prompt_lengths: list[int], max_tokens: int,
                   batch_size: int) -> int:
    """An upper bound of the bytes a run's capture writes, uncompressed, as the npz archiver stores them (floats
    as float32): every batch runs ``max_tokens`` steps, its prompt pass over its longest prompt."""
    sizes = dimension_sizes(config)
    shapes = {name: shape.split(",")[1:] for name, shape, _ in catalogue(config)}
    shapes.update({f"generate.step_{{k}}.sample.{s}": shape.split(",")[1:] for s, shape, _ in SAMPLE_POINTS})

    def per_entry(dims: list[str], keys: int) -> int:
        if dims[0] == "H":  # attention: [heads, seq, keys]
            return sizes["H"] * keys
        count = 1
        for dim in dims[1:]:  # after the sequence axis
            count *= eval_dim(dim, sizes)
        return count

    total = 0
    for start in range(0, len(prompt_lengths), batch_size):
        rows, width = len(prompt_lengths[start:start + batch_size]), max(prompt_lengths[start:start + batch_size])
        for step in range(max_tokens):
            for name in selection.names_for_step(step):
                template = name if not name.startswith("generate.") else "generate.step_{k}." + name.split(".", 2)[2]
                dims = shapes[template]
                seq = 1 if (step > 0 or name.startswith("generate.") or name in ("model.norm_out", "model.logits")
                            or selection.positions == "last") else width
                element = 1 if name.endswith(".kept") else 4
                total += rows * seq * per_entry(dims, width + step) * element
    return total


def dimension_sizes(config: Gemma3Config) -> dict[str, int]:
    """The catalogue's dimension letters as sizes of this model."""
    return {"E": config.hidden_size, "F": config.intermediate_size, "H": config.num_attention_heads,
            "G": config.num_key_value_heads, "D": config.head_dim, "V": config.vocab_size}


def eval_dim(dim: str, sizes: dict[str, int]) -> int:
    """A catalogue dimension (``E``, ``H*D``, ``1``) as a number for a model's sizes."""
    value = 1
    for factor in dim.split("*"):
        value *= sizes[factor] if factor in sizes else int(factor)
    return value
