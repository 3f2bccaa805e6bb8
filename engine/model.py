"""The Gemma 3 text decoder in MLX, with a named capture point at every step.

Reads top to bottom like the architecture: norm, rotary embedding, attention,
MLP, block, model. Every intermediate value passes through ``cap(name, x)``,
which returns ``x`` and records it only when the name was selected; with
nothing selected the calls cost a dictionary lookup.

Shapes: B batch, L new tokens, K keys visible, H query heads, G kv heads,
D head_dim, E hidden_size, F intermediate_size, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .cache import Cache, GlobalCache, SlidingCache
from .capture import NO_CAPTURE, Capture
from .config import Gemma3Config


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * (1 + weight)`` in float32; ``weight`` is stored without the +1."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps
        object.__setattr__(self, "_kept", None)  # (weight, dtype, scale) from keep_scale; not a parameter

    def __call__(self, x: mx.array) -> mx.array:
        # The fast kernel accumulates in float32.
        return mx.fast.rms_norm(x, self.scale(x.dtype), self.eps)

    def scale(self, dtype: mx.Dtype) -> mx.array:
        """``1 + weight`` in ``dtype``: the kept one while the weight is the one it was formed from."""
        kept = self._kept
        if kept is not None and kept[0] is self.weight and kept[1] == dtype:
            return kept[2]
        return self._form(dtype)

    def keep_scale(self, dtype: mx.Dtype) -> mx.array:
        """Forms the scale once for the current weight, so a compiled step reads it instead of recomputing it."""
        scale = self._form(dtype)
        object.__setattr__(self, "_kept", (self.weight, dtype, scale))
        return scale

    def _form(self, dtype: mx.Dtype) -> mx.array:
        return (1.0 + self.weight.astype(mx.float32)).astype(dtype)  # formed in float32, as transformers does


class Linear(nn.Linear):
    """A projection without bias, ``x @ weight.T``; ``keep_transposed`` keeps the transposed view with the weight,
    so a compiled step reads it as it is instead of holding a transpose of every weight."""

    def __init__(self, inputs: int, outputs: int):
        super().__init__(inputs, outputs, bias=False)
        object.__setattr__(self, "_kept", None)  # (weight, weight.T) from keep_transposed; not a parameter

    def __call__(self, x: mx.array) -> mx.array:
        kept = self._kept
        return x @ (kept[1] if kept is not None and kept[0] is self.weight else self.weight.T)

    def keep_transposed(self) -> mx.array:
        transposed = self.weight.T
        object.__setattr__(self, "_kept", (self.weight, transposed))
        return transposed


class Fused:
    """Projections of one module that read the same input (q, k and v; gate and up) as one matrix product with
    their weights joined: two kernels fewer per layer and larger products, which a GPU's decode step, bound by
    kernel launches, runs faster.

    ``keep`` joins the weights of plain ``Linear`` projections; each projection's weight then becomes a view into
    the joined one (they are held once). While the module's projections still have those views as weights, calls
    take the joined path; after new weights or other layers (quantized ones) are loaded, the separate one. The
    projections are looked up on the module at every call, never held here.
    """

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.kept: tuple | None = None  # (the projections' weights, joined weight transposed, split points)

    def keep(self, module: nn.Module) -> list[mx.array]:
        """Joins the weights unless they are joined already or are not all plain ``Linear`` of one dtype; returns
        what to evaluate."""
        projections = [getattr(module, name) for name in self.names]
        if (self._current(projections) is not None or any(type(p) is not Linear for p in projections)
                or len({p.weight.dtype for p in projections}) != 1):
            return []
        joined = mx.concatenate([p.weight for p in projections], axis=0)
        ends, start = [], 0
        for projection in projections:
            size = projection.weight.shape[0]
            projection.weight = joined[start:start + size]
            start += size
            ends.append(start)
        self.kept = ([p.weight for p in projections], joined.T, ends[:-1])
        return [self.kept[1], *self.kept[0]]

    def _current(self, projections: list) -> tuple | None:
        kept = self.kept
        if kept is not None and all(w is getattr(p, "weight", None) for w, p in zip(kept[0], projections)):
            return kept
        return None

    def __call__(self, module: nn.Module, x: mx.array) -> list[mx.array]:
        """Every projection of ``x``."""
        projections = [getattr(module, name) for name in self.names]
        kept = self._current(projections)
        if kept is None:
            return [p(x) for p in projections]
        return mx.split(x @ kept[1], kept[2], axis=-1)


class Rotary:
    """Split-half rotary embedding (``rotate_half`` pairs i with i + D/2) from per-row start positions."""

    def __init__(self, head_dim: int, base: float, scaling: float):
        self.head_dim, self.base, self.scale = head_dim, base, 1.0 / scaling

    def __call__(self, x: mx.array, start: mx.array) -> mx.array:
        """``x`` ``[B, heads, L, D]``; row b's positions are ``start[b] + 0..L-1``."""
        return mx.fast.rope(x, self.head_dim, traditional=False, base=self.base, scale=self.scale, offset=start)


class Attention(nn.Module):
    # Capture points under model.layers.{i}.self_attn.: (name, shape, meaning); shapes use the letters of this
    # file's docstring, S the sequence.
    POINTS = (
        ("q_proj_out", "B,S,H*D", "query projection"),
        ("k_proj_out", "B,S,G*D", "key projection"),
        ("v_proj_out", "B,S,G*D", "value projection"),
        ("queries_reshaped", "B,S,H,D", "queries split into heads"),
        ("keys_reshaped", "B,S,G,D", "keys split into kv heads"),
        ("values_reshaped", "B,S,G,D", "values split into kv heads"),
        ("q_norm_out", "B,S,H,D", "queries after the per-head RMSNorm"),
        ("k_norm_out", "B,S,G,D", "keys after the per-head RMSNorm"),
        ("queries_rope", "B,S,H,D", "queries after rotary embedding"),
        ("keys_rope", "B,S,G,D", "keys after rotary embedding"),
        ("attn_scores", "B,H,S,K", "scaled, masked (-inf), pre-softmax scores over absolute key slots"),
        ("attn_weights", "B,H,S,K", "softmax of the scores: what each query reads (0 where unseen)"),
        ("attn_out", "B,S,H*D", "heads merged, before o_proj"),
        ("o_proj_out", "B,S,E", "attention output projection"),
    )

    def __init__(self, config: Gemma3Config, prefix: str):
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.query_pre_attn_scalar**-0.5
        hidden, width, kv_width = config.hidden_size, self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.q_proj = Linear(hidden, width)
        self.k_proj = Linear(hidden, kv_width)
        self.v_proj = Linear(hidden, kv_width)
        self.o_proj = Linear(width, hidden)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.p = f"{prefix}.self_attn."
        object.__setattr__(self, "fused", Fused(("q_proj", "k_proj", "v_proj")))  # not a child module

    def __call__(self, x, rotary, view: "KeyView", cache, offset, cap: Capture):
        B, L, _ = x.shape
        p = self.p
        queries, keys, values = self.fused(self, x)
        queries = cap(p + "q_proj_out", queries)
        keys = cap(p + "k_proj_out", keys)
        values = cap(p + "v_proj_out", values)
        queries = cap(p + "queries_reshaped", queries.reshape(B, L, self.heads, self.head_dim))
        keys = cap(p + "keys_reshaped", keys.reshape(B, L, self.kv_heads, self.head_dim))
        values = cap(p + "values_reshaped", values.reshape(B, L, self.kv_heads, self.head_dim))
        queries = cap(p + "q_norm_out", self.q_norm(queries)).transpose(0, 2, 1, 3)  # (B, H, L, D)
        keys = cap(p + "k_norm_out", self.k_norm(keys)).transpose(0, 2, 1, 3)  # (B, G, L, D)
        values = values.transpose(0, 2, 1, 3)
        rope, start = rotary
        queries = cap.heads(p + "queries_rope", rope(queries, start))
        keys = cap.heads(p + "keys_rope", rope(keys, start))
        if cache is not None:
            keys, values = cache.update(keys, values, offset)
        if cap.wants(p + "attn_scores", p + "attn_weights"):
            out = self._explicit(queries, keys, values, view, cap)
        else:
            out = kernels.attention(queries, keys, values, self.scale, view.mask)
        out = cap(p + "attn_out", out.transpose(0, 2, 1, 3).reshape(B, L, -1))
        return cap(p + "o_proj_out", self.o_proj(out))

    def _explicit(self, queries, keys, values, view: "KeyView", cap: Capture):
        """Attention with its scores and weights materialised, for capture."""
        B, H, L, D = queries.shape
        G = self.kv_heads
        grouped = queries.reshape(B, G, H // G, L, D)  # query head h reads kv head h // (H / G)
        scores = (grouped * self.scale) @ keys[:, :, None].swapaxes(-1, -2)
        scores = scores.reshape(B, H, L, -1).astype(mx.float32) + view.mask
        cap.attention(self.p + "attn_scores", scores, view.slots, view.total)
        weights = mx.softmax(scores, axis=-1).astype(queries.dtype)
        cap.attention(self.p + "attn_weights", weights, view.slots, view.total)
        out = weights.reshape(B, G, H // G, L, -1) @ values[:, :, None]
        return out.reshape(B, H, L, D)


class MLP(nn.Module):
    POINTS = (  # under model.layers.{i}.mlp.
        ("gate_proj_out", "B,S,F", "gate projection"),
        ("up_proj_out", "B,S,F", "up projection"),
        ("act_out", "B,S,F", "gelu_tanh(gate)"),
        ("hidden", "B,S,F", "gelu_tanh(gate) * up"),
        ("down_proj_out", "B,S,E", "down projection"),
    )

    def __init__(self, config: Gemma3Config, prefix: str):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)
        self.p = f"{prefix}.mlp."
        object.__setattr__(self, "fused", Fused(("gate_proj", "up_proj")))  # not a child module

    def __call__(self, x, cap: Capture):
        p = self.p
        gate, up = self.fused(self, x)
        gate = cap(p + "gate_proj_out", gate)
        up = cap(p + "up_proj_out", up)
        hidden = cap(p + "hidden", cap(p + "act_out", nn.gelu_approx(gate)) * up)  # tanh-approximated gelu
        return cap(p + "down_proj_out", self.down_proj(hidden))


class TransformerBlock(nn.Module):
    POINTS = (  # under model.layers.{i}.; a child's name stands for its points, in the order they are computed
        ("input_layernorm_in", "B,S,E", "residual stream entering the layer"),
        ("input_layernorm_out", "B,S,E", "RMSNorm before attention"),
        "self_attn",
        ("post_attention_layernorm_out", "B,S,E", "RMSNorm after attention"),
        ("resid_mid", "B,S,E", "residual stream after the attention block"),
        ("pre_feedforward_layernorm_out", "B,S,E", "RMSNorm before the MLP"),
        "mlp",
        ("post_feedforward_layernorm_out", "B,S,E", "RMSNorm after the MLP"),
        ("resid_out", "B,S,E", "residual stream leaving the layer"),
        ("logit_lens.tokens", "B,S,T", "logit lens: the T most likely next tokens of final_norm(resid_out) @ E.T"),
        ("logit_lens.probs", "B,S,T", "logit lens: their probabilities (softmax over the vocabulary)"),
    )

    def __init__(self, config: Gemma3Config, index: int):
        super().__init__()
        self.p = p = f"model.layers.{index}."
        self.sliding = config.is_sliding(index)
        self.self_attn = Attention(config, p[:-1])
        self.mlp = MLP(config, p[:-1])
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def __call__(self, x, rotary, view: "KeyView", cache, offset, cap: Capture):
        p = self.p
        h = cap(p + "input_layernorm_out", self.input_layernorm(cap(p + "input_layernorm_in", x)))
        h = self.self_attn(h, rotary, view, cache, offset, cap)
        h = cap(p + "post_attention_layernorm_out", self.post_attention_layernorm(h))
        x = cap(p + "resid_mid", x + h)
        h = cap(p + "pre_feedforward_layernorm_out", self.pre_feedforward_layernorm(x))
        h = self.mlp(h, cap)
        h = cap(p + "post_feedforward_layernorm_out", self.post_feedforward_layernorm(h))
        return cap(p + "resid_out", x + h)


class Gemma3Model(nn.Module):
    """Embedding, blocks and final norm; the tied head lives in ``Gemma3``."""

    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [TransformerBlock(config, i) for i in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Gemma3(nn.Module):
    """Gemma 3 text decoder. Parameter names equal Hugging Face's (``model.layers.N...``)."""

    POINTS = (  # under model.; "layers" stands for every layer's points
        ("embed_tokens_out", "B,S,E", "token embeddings E[ids]"),
        ("embed_scaled", "B,S,E", "embeddings times sqrt(hidden_size): the residual stream's start"),
        "layers",
        ("norm_out", "B,S,E", "final RMSNorm"),
        ("logits", "B,S,V", "logits (generation computes them for the last position only)"),
    )

    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.config = config
        self.model = Gemma3Model(config)
        self.local_rope = Rotary(config.head_dim, config.rope_local_base_freq, 1.0)  # sliding layers: never scaled
        self.global_rope = Rotary(config.head_dim, config.rope_theta, config.rope_scaling_factor)

    @property
    def dtype(self) -> mx.Dtype:
        return self.model.norm.weight.dtype

    def make_cache(self, batch: int, capacity: int) -> Cache:
        """Empty caches of every layer for ``capacity`` slots (prompt + new tokens)."""
        c, dtype = self.config, self.dtype
        layers = [
            SlidingCache.empty(batch, c.num_key_value_heads, c.sliding_window, capacity, c.head_dim, dtype)
            if c.is_sliding(i)
            else GlobalCache.empty(batch, c.num_key_value_heads, capacity, c.head_dim, dtype)
            for i in range(c.num_hidden_layers)
        ]
        return Cache(layers, mx.array(0, mx.int32), capacity)

    def keep_derived(self) -> None:
        """Forms every norm's ``1 + weight`` and every projection's transposed view once, evaluated, so a compiled
        decode step finds them ready (they are formed again when weights change); decode steps call it. On a GPU
        it also joins the weights of q/k/v and of gate/up (``Fused``: fewer kernels per step; on the CPU the
        joined products were slower), one layer at a time, so the model's memory grows by one layer's
        projections at most while they are joined."""
        modules = [m for _, m in self.named_modules()]
        if mx.default_device() != mx.cpu:
            for module in modules:
                if isinstance(module, (Attention, MLP)):
                    mx.eval(module.fused.keep(module))
        mx.eval([m.keep_scale(self.dtype) for m in modules if isinstance(m, RMSNorm)]
                + [m.keep_transposed() for m in modules if isinstance(m, Linear)])

    def __call__(
        self,
        ids: mx.array,
        pad: mx.array | None = None,
        cache: Cache | None = None,
        cap: Capture = NO_CAPTURE,
        last_only: bool = False,
        layers: int | None = None,
    ) -> mx.array | None:
        """Logits ``[B, L, V]`` (``[B, 1, V]`` with ``last_only``) for token ids ``[B, L]``.

        ``pad`` ``[B]`` counts each row's leading pad tokens (left padding);
        ``cache`` from ``make_cache`` continues a sequence, otherwise ``ids``
        is the whole sequence. ``layers``: run only the first ``layers`` blocks and return None (what a
        capture that needs nothing later computes: ``gemmalens harvest``).
        """
        c = self.config
        B, L = ids.shape
        pad = mx.zeros((B,), dtype=mx.int32) if pad is None else pad
        offset = cache.offset if cache is not None else mx.array(0, mx.int32)
        start = offset - pad  # (B,) position of each row's first new token (negative inside padding)

        h = cap("model.embed_tokens_out", self.model.embed_tokens(ids))
        h = cap("model.embed_scaled", h * mx.array(math.sqrt(c.hidden_size), mx.float32).astype(h.dtype))

        rotary = {True: (self.local_rope, start), False: (self.global_rope, start)}
        total = cache.capacity if cache is not None else L  # key slots an attention capture covers
        views = {}
        for i, layer in enumerate(self.model.layers[:layers]):
            sliding = layer.sliding
            layer_cache = cache[i] if cache is not None else None
            if sliding not in views:
                window = c.sliding_window if sliding else None
                views[sliding] = KeyView.of(offset, L, pad, layer_cache, window, total, h.dtype)
            h = layer(h, rotary[sliding], views[sliding], layer_cache, offset, cap)
            if cap.wants(layer.p + "logit_lens.tokens", layer.p + "logit_lens.probs"):
                self._logit_lens(layer.p, h, cap)
        if cache is not None:
            cache.offset = offset + L
        if layers is not None:
            return None

        if last_only:
            h = h[:, -1:]
        h = cap("model.norm_out", self.model.norm(h))
        return cap("model.logits", self.model.embed_tokens.as_linear(h))


    def _logit_lens(self, prefix: str, h: mx.array, cap: Capture) -> None:
        """The layer's residual stream read by the final norm and the tied unembedding: the ``LENS_TOP`` most
        likely tokens at each position and their probabilities, most likely first."""
        logits = self.model.embed_tokens.as_linear(self.model.norm(h)).astype(mx.float32)
        top = mx.argpartition(-logits, kth=LENS_TOP - 1, axis=-1)[..., :LENS_TOP]
        chosen = mx.take_along_axis(logits, top, axis=-1)
        order = mx.argsort(-chosen, axis=-1)
        probs = mx.exp(mx.take_along_axis(chosen, order, axis=-1) - mx.logsumexp(logits, axis=-1, keepdims=True))
        cap(prefix + "logit_lens.tokens", mx.take_along_axis(top, order, axis=-1).astype(mx.int32))
        cap(prefix + "logit_lens.probs", probs)


LENS_TOP = 10  # tokens the logit lens keeps per position


@dataclass
class KeyView:
    """What the attention of one layer type sees in one forward pass, built once for all its layers.

    ``slots`` ``[K]``: the slot of each key column; ``mask`` ``[B, 1, L, K]``: 0 where a query sees
    the key, -inf elsewhere (additive: the fused attention kernel is faster with it than with a
    boolean mask); ``total``: the key slots an attention capture covers.
    """

    slots: mx.array
    mask: mx.array
    total: int

    @classmethod
    def of(cls, offset, length: int, pad, cache, window: int | None, total: int, dtype: mx.Dtype) -> "KeyView":
        slots = cache.slots(offset, length) if cache is not None else mx.arange(length)
        seen = attention_mask(offset + mx.arange(length), slots, pad, window)
        return cls(slots, mx.where(seen, mx.array(0, dtype), mx.array(-mx.inf, dtype)), total)


def attention_mask(query_slots, key_slots, pad, window: int | None) -> mx.array:
    """Which keys each query sees: ``[B, 1, L, K]`` bool.

    Causal, not padding, and (sliding layers) ``q - window < k``. A pad query
    sees itself alone, so no softmax row is empty; its output is meaningless.
    """
    q, k = query_slots[:, None], key_slots[None]
    seen = (k <= q) & (k >= 0)
    if window is not None:
        seen = seen & (k > q - window)
    seen = seen[None] & (k[None] >= pad[:, None, None])
    seen = seen | (k == q)[None]
    return seen[:, None]
