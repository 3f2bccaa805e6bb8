"""Interventions applied: each site's ops in force become one elementwise edit ``x * keep + put``.

``prepare`` checks a run's interventions against the model (the site exists and can be edited, arrays fit it,
heads and indices are in range, a patch's source holds the site) once. ``BatchEdits`` turns them, for one
batch, into the ``(keep, put)`` arrays of each forward pass: ``[batch, seq, ...]`` like the site's value, 1
and 0 wherever nothing is edited (so ``x * 1 + 0`` leaves it exact). Ops at one site compose in the order
given. The arrays are inputs of the compiled decode step: new values never recompile it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import numpy as np

from gemmalens.errors import ConfigError
from gemmalens.interventions import Intervention
from gemmalens.prompts import Prompt

from .config import Gemma3Config
from .selection import catalogue, dimension_sizes, eval_dim

HEAD_AXES = {"H": "H", "G": "G", "H*D": "H", "G*D": "G"}  # a site's first dimension after seq: whose heads


@dataclass(frozen=True, eq=False)
class Prepared:
    """An intervention checked against the model: ``tail`` the site's shape after ``[batch, seq]``, ``where``
    the entries of one position it edits (heads, clamp's index), ``values`` what it writes (``[*tail]``, or
    ``[P, *tail]`` by position with ``present[P]`` saying which positions it has), at ``site``."""

    intervention: Intervention
    tail: tuple[int, ...]
    where: np.ndarray
    values: np.ndarray | None
    present: np.ndarray | None
    site: str
    feature: tuple[str, int] | None = None  # clamp/ablate_feature: (SAE name, feature), applied by the capture


def editable_sites(config: Gemma3Config) -> dict[str, list[str]]:
    """Every site an intervention may name, with its dimensions after ``[batch, seq]`` (not attention scores and
    weights, not the logit lens: a reading beside the model, nothing downstream uses it)."""
    return {name: shape.split(",")[2:] for name, shape, _ in catalogue(config)
            if name.startswith("model.") and not shape.startswith("B,H,S,K") and ".logit_lens." not in name}


def prepare(interventions: Sequence[Intervention], config: Gemma3Config, saes: Sequence = ()) -> list[Prepared]:
    """Checks each intervention against the model (and the attached SAEs, for feature ops)."""
    sites, sizes = editable_sites(config), dimension_sizes(config)
    by_name = {sae.name: sae for sae in saes}
    out = []
    for n, iv in enumerate(interventions):
        where = f"intervention {n} ({iv.op} at {iv.site or iv.sae})"
        out.append(_prepare_feature(iv, by_name, sites, sizes, where) if iv.sae is not None
                   else _prepare(iv, iv.site, sites, sizes, where))
    return out


def _prepare_feature(iv: Intervention, saes: dict, sites, sizes, where: str) -> Prepared:
    """A feature op: ``add_feature`` is ``add`` of the decoder row at the SAE's output site; ``clamp_feature`` and
    ``ablate_feature`` move the value by ``(c - f_i) * w_dec[i]`` there, ``f_i`` encoded from the SAE's input."""
    sae = saes.get(iv.sae)
    if sae is None:
        raise ConfigError(f"{where}: no SAE named {iv.sae!r} is attached (attached: {', '.join(saes) or 'none'}; "
                          "attach it with --sae or saes=[...])")
    if iv.feature >= sae.width:
        raise ConfigError(f"{where}: feature {iv.feature} outside 0-{sae.width - 1} of SAE {sae.name}")
    row = np.array(sae.w_dec[iv.feature].astype(mx.float32))
    prepared = _prepare(iv, sae.site_out, sites, sizes, where)
    return Prepared(iv, prepared.tail, prepared.where, row, None, sae.site_out,
                    None if iv.op == "add_feature" else (sae.name, iv.feature))


def _prepare(iv: Intervention, site: str, sites: dict[str, list[str]], sizes: dict[str, int], where: str
             ) -> Prepared:
    if site not in sites:
        near = difflib.get_close_matches(site, list(sites), n=5, cutoff=0.5)
        attention = site.endswith(("attn_scores", "attn_weights"))
        raise ConfigError(f"{where}: {site!r} is not a site this model can edit"
                          + ("; attention scores and weights cannot be edited (edit queries_rope or keys_rope, or "
                             "zero heads at self_attn.attn_out)" if attention else "")
                          + (f"; nearest: {', '.join(near)}" if near and not attention else "")
                          + " (`gemmalens names` lists the capture points)")
    dims = sites[site]
    tail = tuple(eval_dim(d, sizes) for d in dims)
    mask = np.ones(tail, dtype=bool)
    if iv.heads is not None:
        mask = _head_mask(iv, dims, tail, sizes, where)
    if iv.op == "clamp":
        if iv.index >= tail[-1]:
            raise ConfigError(f"{where}: index {iv.index} outside the site's last axis (size {tail[-1]})")
        chosen = np.zeros(tail, dtype=bool)
        chosen[..., iv.index] = True
        mask &= chosen
    values = present = None
    if iv.array is not None:
        values = _fit(iv, dims, tail, sizes, where)
        if values.ndim == len(tail) + 1:
            present = np.ones(values.shape[0], dtype=bool)
    elif iv.op == "patch":
        values, present = _source(iv, tail, where)
    return Prepared(iv, tail, mask, values, present, site)


def _head_mask(iv: Intervention, dims: list[str], tail: tuple[int, ...], sizes, where: str) -> np.ndarray:
    kind = HEAD_AXES.get(dims[0]) if dims else None
    if kind is None:
        raise ConfigError(f"{where}: 'heads' needs a site with heads (q/k/v projections and their per-head "
                          "forms, self_attn.attn_out); this one has none")
    count = sizes[kind]
    outside = [h for h in iv.heads if h >= count]
    if outside:
        raise ConfigError(f"{where}: heads {outside} outside 0-{count - 1}")
    mask = np.zeros(tail, dtype=bool)
    width = sizes["D"] if "*" in dims[0] else 1  # heads merged: head h is features h*D .. (h+1)*D - 1
    for h in iv.heads:
        mask[h * width:(h + 1) * width] = True
    return mask


def _fit(iv: Intervention, dims: list[str], tail: tuple[int, ...], sizes, where: str) -> np.ndarray:
    """The op's array shaped for the site: ``[*tail]`` or, by position, ``[P, *tail]``."""
    array = iv.array
    if iv.heads is not None and "*" in dims[0] and array.shape[-1] == sizes["D"] != tail[-1]:
        array = np.tile(array, tail[-1] // sizes["D"])  # one head's vector, for each head (only the listed edited)
    for shape in (tail, (array.shape[0], *tail) if array.ndim == len(tail) + 1 else None):
        if shape is not None:
            try:
                return np.broadcast_to(array, shape).astype(np.float32)
            except ValueError:
                pass
    raise ConfigError(f"{where}: its array has shape {list(iv.array.shape)}; the site takes {list(tail)} (the same "
                      f"for every position) or [positions, {', '.join(map(str, tail))}]")


def _source(iv: Intervention, tail: tuple[int, ...], where: str) -> tuple[np.ndarray, np.ndarray]:
    from gemmalens.sinks.reader import open_activations

    try:
        archive = open_activations(iv.source)
        positions, values = archive.trajectory(iv.site, iv.source_prompt)
    except (FileNotFoundError, KeyError, ValueError) as error:
        message = error.args[0] if error.args else str(error)
        raise ConfigError(f"{where}: cannot read the source: {message}") from None
    if len(positions) == 0:
        raise ConfigError(f"{where}: {iv.source} holds no values of {iv.site} for prompt {iv.source_prompt}")
    if tuple(values.shape[1:]) != tail:
        raise ConfigError(f"{where}: the source's values have shape {list(values.shape[1:])} per position, this "
                          f"model's site {list(tail)}: it comes from another model")
    size = int(positions.max()) + 1
    table, present = np.zeros((size, *tail), np.float32), np.zeros(size, dtype=bool)
    table[positions], present[positions] = values, True
    return table, present


class BatchEdits:
    """The edits of one batch: ``at(step, slots)`` gives each edited site's ``(keep, put, features)`` for a forward
    pass over the key ``slots`` of the left-padded sequence (the prompt pass: 0..width-1; decode step k:
    width+k-1). ``features`` holds a ``(mask, value)`` pair per entry of ``plan[site]`` (an SAE name and feature
    to clamp there; ``mask`` ``[batch, seq, 1]`` is 1 where it applies)."""

    def __init__(self, prepared: Sequence[Prepared], prompts: Sequence[Prompt], pads: Sequence[int], width: int,
                 dtype: mx.Dtype):
        self.rows = {id(p): np.array([p.intervention.applies_to(q.index, q.category) for q in prompts])
                     for p in prepared}
        self.prepared = [p for p in prepared if self.rows[id(p)].any()]
        self.pads, self.width, self.dtype = np.array(pads), width, dtype
        self.sites = sorted({p.site for p in self.prepared})
        self.plan = {site: tuple(p.feature for p in self.prepared if p.site == site and p.feature is not None)
                     for site in self.sites}
        self.indices = [q.index for q in prompts]

    def __bool__(self) -> bool:
        return bool(self.prepared)

    @property
    def structure(self) -> tuple:
        """What a compiled step depends on besides the arrays' values: the sites and the feature clamps."""
        return tuple(sorted(self.plan.items()))

    def records(self) -> list[dict]:
        """What is in force in this batch: each intervention's record, id and rows (prompt ids)."""
        return [{**p.intervention.record(), "id": p.intervention.id, "digest": p.intervention.digest,
                 "rows": [i for i, hit in zip(self.indices, self.rows[id(p)]) if hit]} for p in self.prepared]

    def ids_for(self, index: int) -> list[str]:
        """The ids of the interventions that apply to prompt ``index``."""
        row = self.indices.index(index)
        return [p.intervention.id for p in self.prepared if self.rows[id(p)][row]]

    def at(self, step: int, slots: np.ndarray) -> dict[str, tuple]:
        B, L = len(self.pads), len(slots)
        positions = np.asarray(slots)[None, :] - self.pads[:, None]  # [B, L]; < 0: padding
        prompt_length = (self.width - self.pads)[:, None]
        out = {}
        for site in self.sites:
            tail = next(p.tail for p in self.prepared if p.site == site)
            keep, put = np.ones((B, L, *tail), np.float32), np.zeros((B, L, *tail), np.float32)
            features = []
            for p in self.prepared:
                iv = p.intervention
                if p.site != site:
                    continue
                chosen = self._chosen(p, step, positions, prompt_length)
                if p.feature is not None:  # applied by the capture: where, and the value to clamp to
                    value = np.full((B, L, 1), iv.value if iv.op == "clamp_feature" else 0.0, np.float32)
                    features.append((mx.array(chosen[..., None].astype(np.float32), dtype=self.dtype),
                                     mx.array(value, dtype=self.dtype)))
                    continue
                values = p.values
                if p.present is not None:  # by position: where it has a value
                    at = np.clip(positions, 0, len(p.present) - 1)
                    chosen &= (positions < len(p.present)) & p.present[at]
                    values = p.values[at]
                edited = chosen.reshape(B, L, *(1,) * len(tail)) & p.where
                k, v = _op(iv, values)
                keep, put = np.where(edited, keep * k, keep), np.where(edited, put * k + v, put)
            out[site] = (mx.array(keep, dtype=self.dtype), mx.array(put, dtype=self.dtype), tuple(features))
        return out

    def _chosen(self, p: Prepared, step: int, positions: np.ndarray, prompt_length: np.ndarray) -> np.ndarray:
        """``[B, L]``: where ``p`` edits in this pass (nothing when it is not in force at ``step``)."""
        iv = p.intervention
        chosen = self.rows[id(p)][:, None] & (positions >= 0) & iv.in_force(step)
        if iv.positions == "prompt":
            chosen &= positions < prompt_length
        elif iv.positions == "generated":
            chosen &= positions >= prompt_length
        elif not isinstance(iv.positions, str):
            chosen &= np.isin(positions, iv.positions)
        return chosen


def _op(iv: Intervention, values: np.ndarray | None) -> tuple[float, np.ndarray | float]:
    """An op as (factor of x, what is added): ``x * k + v``."""
    if iv.op in ("add", "add_feature"):
        return 1.0, iv.scale * values
    if iv.op == "zero":
        return 0.0, 0.0
    if iv.op == "clamp":
        return 0.0, iv.value
    return 0.0, values  # mean, set, patch
