"""The catalogue of capture points, derived from the model, and the selection of points and positions.

Each point is declared once, beside the code that computes it (``POINTS`` of the model's modules in
engine/model.py, of sampling in engine/sampling.py); ``catalogue`` lays them out for one configuration.
A selection is fixed before the run: include/exclude glob patterns, an optional layer range, and the
positions kept (``all``, ``prompt``, ``generated``, ``last``). A pattern that matches nothing is an error that
lists the nearest names.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Sequence

from gemmalens.errors import SelectionError
from gemmalens.spec import POSITIONS
from gemmalens.wire import SAMPLE_TEMPLATE

from . import sampling
from .config import Gemma3Config
from .model import LENS_TOP, MLP, Attention, Gemma3, TransformerBlock

# Dimension letters of the declared shapes and the axis names frames carry (docs/protocol.md).
AXIS_NAMES = {"B": "batch", "S": "seq", "1": "seq", "E": "hidden", "F": "intermediate", "H": "heads",
              "G": "kv_heads", "D": "head_dim", "K": "keys", "V": "vocab", "H*D": "features", "G*D": "features",
              "T": "top"}
_CHILDREN = {"self_attn": Attention, "mlp": MLP}


def catalogue(config: Gemma3Config, saes: Sequence = ()) -> list[tuple[str, str, str]]:
    """(name, shape, meaning) of every point, in the order a forward pass computes them; sampling points as
    ``generate.step_{k}.sample.<name>``; each attached SAE's as ``sae.<name>.*`` (their width a number)."""
    out = []
    for entry in Gemma3.POINTS:
        if entry == "layers":
            for i in range(config.num_hidden_layers):
                out += _expand(TransformerBlock.POINTS, f"model.layers.{i}.")
        else:
            out.append(("model." + entry[0], *entry[1:]))
    out += [(SAMPLE_TEMPLATE + name, shape, meaning) for name, shape, meaning in sampling.POINTS]
    for sae in saes:
        out += [(f"sae.{sae.name}.features", f"B,S,{sae.width}", f"feature activations of {sae.site}"),
                (f"sae.{sae.name}.error", "B,S", f"relative reconstruction error at {sae.site_out}")]
    return out


def _expand(points, prefix: str) -> list[tuple[str, str, str]]:
    out = []
    for entry in points:
        if isinstance(entry, str):
            out += _expand(_CHILDREN[entry].POINTS, f"{prefix}{entry}.")
        else:
            out.append((prefix + entry[0], *entry[1:]))
    return out


def axes_of(shape: str) -> tuple[str, ...]:
    """A declared shape (``B,S,H*D``) as axis names (``batch, seq, features``; an SAE's width: ``latents``)."""
    return tuple("latents" if dim.isdigit() and dim != "1" else AXIS_NAMES[dim] for dim in shape.split(","))


def dimension_sizes(config: Gemma3Config) -> dict[str, int]:
    """The catalogue's dimension letters as sizes of this model."""
    return {"E": config.hidden_size, "F": config.intermediate_size, "H": config.num_attention_heads,
            "G": config.num_key_value_heads, "D": config.head_dim, "V": config.vocab_size, "T": LENS_TOP}


def eval_dim(dim: str, sizes: dict[str, int]) -> int:
    """A catalogue dimension (``E``, ``H*D``, ``1``) as a number for a model's sizes."""
    value = 1
    for factor in dim.split("*"):
        value *= sizes[factor] if factor in sizes else int(factor)
    return value


def sample_name(step: int, name: str) -> str:
    """The capture name of one step's sampling value: ``generate.step_{step}.sample.{name}``."""
    return SAMPLE_TEMPLATE.replace("{k}", str(step)) + name


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
    """Which points are captured (model names; sampling values by the patterns that choose them, per step) and
    at which positions."""

    model_names: frozenset[str]
    sample_patterns: tuple[str, ...]
    sample_exclude: tuple[str, ...]
    positions: str
    axes: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False)  # model names and templates

    def __bool__(self) -> bool:
        return bool(self.model_names or self.sample_patterns)

    def to_dict(self) -> dict:
        """The selection as ``run.start`` carries it."""
        return {"names": sorted(self.model_names), "sampling": list(self.sample_patterns),
                "sampling_excluded": list(self.sample_exclude), "positions": self.positions}

    def names_for_step(self, step: int) -> set[str]:
        """Concrete names to capture at one step (model points plus that step's sampling values)."""
        if self.positions == "prompt" and step > 0:
            return set()
        samples = {sample_name(step, value) for value, _, _ in sampling.POINTS
                   if _chooses(self.sample_patterns, step, value) and not _chooses(self.sample_exclude, step, value)}
        if self.positions == "generated" and step == 0:
            return samples
        return set(self.model_names) | samples

    def axes_of(self, name: str) -> tuple[str, ...]:
        """The axes of a captured name (a step's sampling name included)."""
        if name.startswith("generate."):
            return self.axes[SAMPLE_TEMPLATE + name.rsplit(".", 1)[1]]
        return self.axes[name]


def _chooses(patterns: tuple[str, ...], step: int, value: str) -> bool:
    """Whether a pattern names this step's sampling value: as the template (every step) or as this step's name."""
    return any(fnmatch.fnmatchcase(SAMPLE_TEMPLATE + value, p) or fnmatch.fnmatchcase(sample_name(step, value), p)
               for p in patterns)


NO_SELECTION = Selection(frozenset(), (), (), "all")


def select(
    config: Gemma3Config,
    include: list[str] | tuple[str, ...] = (),
    exclude: list[str] | tuple[str, ...] = (),
    layers: str | None = None,
    positions: str = "all",
    saes: Sequence = (),
) -> Selection:
    """Resolves patterns against the model's points; errors name the pattern and near names.

    A sampling value matches a pattern as its template (``generate.step_{k}.sample.token``: every step) or as
    a step's name (``generate.step_3.sample.token``: that step; ``generate.step_*.sample.token``: every step)."""
    if positions not in POSITIONS:
        raise SelectionError(f"positions {positions!r}: expected one of {', '.join(POSITIONS)}")
    wanted_layers = parse_layers(layers, config.num_hidden_layers)
    if not include:
        return NO_SELECTION
    points = catalogue(config, saes)
    model_points = [name for name, _, _ in points if not name.startswith("generate.")]
    templates = [name for name, _, _ in points if name.startswith("generate.")]
    chosen: set[str] = set()
    sample_patterns: list[str] = []
    for pattern in include:
        hits = [n for n in model_points if fnmatch.fnmatchcase(n, pattern)]
        sample_hit = any(fnmatch.fnmatchcase(t, pattern) or fnmatch.fnmatchcase(t.replace("{k}", "0"), pattern)
                         or _names_some_step(pattern, t[len(SAMPLE_TEMPLATE):]) for t in templates)
        if not hits and not sample_hit:
            near = difflib.get_close_matches(pattern, model_points + templates, n=5, cutoff=0.4)
            raise SelectionError(
                f"capture pattern {pattern!r} matches no capture point"
                + (f"; nearest names: {', '.join(near)}" if near else "")
                + " (`gemmalens names` lists them all)"
            )
        chosen.update(hits)
        if sample_hit:
            sample_patterns.append(pattern)
    chosen = {n for n in chosen if not any(fnmatch.fnmatchcase(n, p) for p in exclude)}
    if wanted_layers is not None:
        chosen = {n for n in chosen if _layer_of(n) is None or _layer_of(n) in wanted_layers}
    axes = {name: axes_of(shape) for name, shape, _ in points}
    return Selection(frozenset(chosen), tuple(sample_patterns), tuple(exclude), positions, axes)


def _names_some_step(pattern: str, value: str) -> bool:
    """True when ``pattern`` names a concrete step's value, e.g. ``generate.step_41.sample.token``."""
    parts = pattern.split(".")
    if len(parts) >= 2 and parts[0] == "generate" and parts[1].startswith("step_") and parts[1][5:].isdigit():
        return fnmatch.fnmatchcase(sample_name(int(parts[1][5:]), value), pattern)
    return False


def estimate_bytes(config: Gemma3Config, selection: Selection, prompt_lengths: list[int], max_tokens: int,
                   batch_size: int, saes: Sequence = ()) -> int:
    """An upper bound of the bytes a run's capture writes, uncompressed, as the npz archiver stores them (floats
    as float32): every batch runs ``max_tokens`` steps, its prompt pass over its longest prompt."""
    sizes = dimension_sizes(config)
    shapes = {name: shape.split(",")[1:] for name, shape, _ in catalogue(config, saes)}

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
                sampled = name.startswith("generate.")
                dims = shapes[SAMPLE_TEMPLATE + name.rsplit(".", 1)[1] if sampled else name]
                seq = 1 if (step > 0 or sampled or name in ("model.norm_out", "model.logits")
                            or selection.positions == "last") else width
                element = 1 if name.endswith(".kept") else 4
                total += rows * seq * per_entry(dims, width + step) * element
    return total
