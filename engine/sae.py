"""Gemma Scope 2 sparse autoencoders and transcoders (JumpReLU), read from their published layout.

A folder ``{kind}[_all]/layer_{L}_width_{W}_l0_{size}[_affine]/`` holds ``params.safetensors`` (``w_enc``
[d_in, width], ``b_enc``, ``w_dec`` [width, d_out], ``b_dec``, ``threshold``, and for skip transcoders
``affine_skip_connection`` [d_in, d_out]) and ``config.json`` (``hf_hook_point_in``/``_out`` name where it
reads and writes in transformers' module names). Encoding: ``pre = x @ w_enc + b_enc``, ``f = pre * (pre >
threshold)``; decoding ``f @ w_dec + b_dec`` (plus ``x @ affine_skip_connection`` for a skip transcoder).

The hook point decides the gemmalens site: ``model.layers.L.output`` is ``resid_out``, ``...self_attn.o_proj
.input`` is ``self_attn.attn_out``, ``...pre_feedforward_layernorm.output`` is ``pre_feedforward_layernorm_out``
and ``...post_feedforward_layernorm.output`` ``post_feedforward_layernorm_out``; a folder whose kind disagrees
with its hook point, or an SAE whose width does not fit the model's site, is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from gemmalens.errors import CheckpointError, ConfigError

from .config import Gemma3Config
from .selection import dimension_sizes, eval_dim

HOOKS = (  # transformers' module output (or input) -> the gemmalens point under model.layers.L.
    (r"output", "resid_out"),
    (r"self_attn\.o_proj\.input", "self_attn.attn_out"),
    (r"pre_feedforward_layernorm\.output", "pre_feedforward_layernorm_out"),
    (r"post_feedforward_layernorm\.output", "post_feedforward_layernorm_out"),
)
FOLDER_KINDS = {"resid_post": "resid_out", "attn_out": "self_attn.attn_out", "mlp_out":
                "post_feedforward_layernorm_out", "transcoder": "pre_feedforward_layernorm_out"}
PARAMS = ("w_enc", "b_enc", "w_dec", "b_dec", "threshold")


def site_of_hook(hook: str) -> str:
    """The gemmalens capture point of a transformers hook point name; a ConfigError for any other."""
    for pattern, point in HOOKS:
        match = re.fullmatch(rf"model\.(?:language_model\.)?layers\.(\d+)\.{pattern}", hook or "")
        if match:
            return f"model.layers.{match.group(1)}.{point}"
    raise ConfigError(f"hook point {hook!r} is not one gemmalens maps (expected model.layers.L.output, "
                      "...self_attn.o_proj.input, ...pre_feedforward_layernorm.output or "
                      "...post_feedforward_layernorm.output)")


@dataclass(eq=False)
class SAE:
    """A JumpReLU SAE or transcoder in MLX. ``site``: where it reads; ``site_out``: where its reconstruction
    belongs (the site itself for an SAE; the MLP output for a transcoder)."""

    name: str
    site: str
    site_out: str
    kind: str  # "sae" or "transcoder"
    w_enc: mx.array
    b_enc: mx.array
    w_dec: mx.array
    b_dec: mx.array
    threshold: mx.array
    skip: mx.array | None
    config: dict
    source: str

    @property
    def width(self) -> int:
        return self.w_enc.shape[1]

    def encode(self, x: mx.array) -> mx.array:
        """Feature activations ``[..., width]`` of values ``[..., d_in]`` (computed in the SAE's dtype)."""
        pre = x.astype(self.w_enc.dtype) @ self.w_enc + self.b_enc
        return mx.where(pre > self.threshold, pre, mx.zeros_like(pre))

    def decode(self, features: mx.array, x: mx.array | None = None) -> mx.array:
        """The reconstruction ``[..., d_out]``; a skip transcoder needs its input ``x`` too."""
        out = features.astype(self.w_dec.dtype) @ self.w_dec + self.b_dec
        if self.skip is not None:
            if x is None:
                raise ValueError(f"{self.name}: a skip transcoder's decode needs its input x")
            out = out + x.astype(self.skip.dtype) @ self.skip
        return out

    def check(self, config: Gemma3Config) -> None:
        """Refuses a model whose site this SAE cannot read: another layer count or width."""
        layer = int(self.site.split(".")[2])
        if layer >= config.num_hidden_layers:
            raise ConfigError(f"SAE {self.name} reads layer {layer}; the model has {config.num_hidden_layers} "
                              "layers: it belongs to a larger Gemma 3")
        from .editing import editable_sites

        sizes, dims = dimension_sizes(config), editable_sites(config)
        for site, size, what in ((self.site, self.w_enc.shape[0], "d_in"), (self.site_out, self.w_dec.shape[1],
                                                                           "d_out")):
            expected = eval_dim(dims[site][-1], sizes)
            if size != expected:
                raise ConfigError(f"SAE {self.name}: {what} {size} but the model's {site} has {expected} values per "
                                  "position: it was trained for another Gemma 3 size")


def load_sae(source: str | Path, dtype: str | None = "float32", name: str | None = None) -> SAE:
    """An SAE from a local folder in the Gemma Scope 2 layout, or ``REPO_ID/FOLDER/SAE`` on the Hub (cached;
    offline, the Hub cache alone). ``name`` (default: derived from the folders, as ``resid_post_layer_5_...``)
    names its capture points ``sae.<name>.features`` and ``sae.<name>.error``."""
    folder = _folder(source)
    config_path, params_path = folder / "config.json", folder / "params.safetensors"
    for path in (config_path, params_path):
        if not path.exists():
            raise CheckpointError(f"{folder}: no {path.name}; an SAE folder holds config.json and params.safetensors")
    try:
        config = json.loads(config_path.read_text())
        weights = mx.load(str(params_path))
    except (json.JSONDecodeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{folder}: unreadable SAE files ({error})") from None
    missing = [p for p in PARAMS if p not in weights]
    if missing:
        raise CheckpointError(f"{params_path}: no {', '.join(missing)} (a JumpReLU SAE has {', '.join(PARAMS)})")
    if config.get("architecture", "jump_relu") != "jump_relu":
        raise CheckpointError(f"{config_path}: architecture {config.get('architecture')!r}; gemmalens reads "
                              "jump_relu SAEs")
    site = site_of_hook(config.get("hf_hook_point_in"))
    kind = "transcoder" if config.get("type") == "transcoder" or "transcoder" in folder.parent.name else "sae"
    site_out = site_of_hook(config.get("hf_hook_point_out")) if kind == "transcoder" else site
    _check_folder(folder, site, config_path)
    w_enc, w_dec = weights["w_enc"], weights["w_dec"]
    if w_dec.shape[0] != w_enc.shape[1] or any(weights[p].shape != (w_enc.shape[1],) for p in ("b_enc",
                                                                                              "threshold")):
        raise CheckpointError(f"{params_path}: inconsistent shapes (w_enc {w_enc.shape}, w_dec {w_dec.shape})")
    casts = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16, None: w_enc.dtype}
    if dtype not in casts:
        raise ConfigError(f"SAE dtype {dtype!r}: expected float32, bfloat16, float16 or None (as stored)")
    cast = casts[dtype]
    skip = weights.get("affine_skip_connection")
    derived = re.sub(r"[^A-Za-z0-9_]", "_", f"{folder.parent.name}_{folder.name}")
    if name is not None and not re.fullmatch(r"[A-Za-z0-9_]{1,80}", name):
        raise ConfigError(f"SAE name {name!r}: letters, digits and '_' only (it becomes a capture name)")
    return SAE(name or derived, site, site_out, kind, *(weights[p].astype(cast) for p in
                                                        ("w_enc", "b_enc", "w_dec", "b_dec", "threshold")),
               skip.astype(cast) if skip is not None else None, config, str(source))


def _check_folder(folder: Path, site: str, config_path: Path) -> None:
    """The folder's kind and layer, where its name says them, agree with the hook point."""
    kind = re.sub(r"_all$", "", folder.parent.name)
    layer = re.match(r"layer_(\d+)_", folder.name)
    expected = FOLDER_KINDS.get(kind)
    if expected is not None and not site.endswith("." + expected):
        raise ConfigError(f"{config_path}: its hook point reads {site}, but the folder {kind}/ holds SAEs of "
                          f"{expected}: the files do not belong together")
    if layer and f".layers.{layer.group(1)}." not in site:
        raise ConfigError(f"{config_path}: its hook point reads {site}, but the folder says layer {layer.group(1)}")


def _folder(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    parts = text.split("/")
    if text.startswith((".", "/", "~")) or len(parts) < 3:
        raise CheckpointError(f"SAE {text}: no such folder (and not REPO_ID/FOLDER/SAE on the Hub)")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import snapshot_download

    patterns = [f"{sub}/config.json", f"{sub}/params.safetensors"]
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns)) / sub
    except Exception as online_error:
        try:
            return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True)) / sub
        except Exception:
            raise CheckpointError(
                f"SAE {text}: not a local folder, not in the Hugging Face cache, and the Hub could not be reached "
                f"({type(online_error).__name__}). Download {sub}/config.json and {sub}/params.safetensors of "
                f"{repo} where there is internet (`huggingface-cli download {repo} --include '{sub}/*'`) and copy "
                "the cache, or pass the local folder") from None


def attach(saes, config: Gemma3Config, dtype: str | None = "float32") -> list[SAE]:
    """The SAEs a run attaches: ``SAE`` objects as they are, sources loaded in ``dtype``; each checked against the
    model's ``config``, and two of one name refused (their capture points would collide)."""
    out = [sae if isinstance(sae, SAE) else load_sae(sae, dtype=dtype) for sae in saes]
    for sae in out:
        sae.check(config)
    names = [sae.name for sae in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"two attached SAEs have the same name ({', '.join(names)}): attach each once")
    return out


class SaeMonitor:
    """Each attached SAE's mean reconstruction error and L0 over the positions a run computed (padding and
    finished rows left out); a mean error above ``threshold`` says the SAE reads something it was not trained
    on (the wrong site, model or dtype)."""

    def __init__(self, saes, threshold: float = 0.5):
        self.saes, self.threshold = list(saes), threshold
        self.sums = {sae.name: [0.0, 0.0, 0] for sae in self.saes}  # error, L0, positions
        self.top: dict[str, list] = {sae.name: [] for sae in self.saes}  # [(feature, activation)] latest

    def add(self, stats: dict[str, tuple[mx.array, ...]], valid) -> None:
        """One forward pass's ``(error, L0, top features, their activations)`` per SAE (``[B, L]``, ``[B, L]``,
        ``[B, k]``, ``[B, k]``), counted where ``valid`` ``[B, L]`` (numpy bool); the top features are kept of
        the first row still generating."""
        import numpy as np

        for name, (error, l0, top, activations) in stats.items():
            error, l0 = np.array(error), np.array(l0)
            keep = np.asarray(valid)[:, -error.shape[1]:]
            total = self.sums[name]
            total[0] += float(error[keep].sum())
            total[1] += float(l0[keep].sum())
            total[2] += int(keep.sum())
            rows = np.nonzero(keep[:, -1])[0]
            if len(rows):
                pairs = zip(np.array(top)[rows[0]].tolist(), np.array(activations)[rows[0]].tolist())
                self.top[name] = sorted(((f, round(a, 3)) for f, a in pairs if a > 0), key=lambda p: -p[1])

    def summary(self) -> dict[str, dict]:
        return {sae.name: {"site": sae.site, "positions": self.sums[sae.name][2],
                           "mean_error": self.sums[sae.name][0] / max(self.sums[sae.name][2], 1),
                           "mean_l0": self.sums[sae.name][1] / max(self.sums[sae.name][2], 1),
                           "top_features": self.top[sae.name]} for sae in self.saes}

    def warnings(self) -> list[str]:
        return [f"SAE {name} reconstructs its site badly: mean relative error {s['mean_error']:.2f} over "
                f"{s['positions']} positions (above {self.threshold:g}); check it reads the site, model and dtype "
                "it was trained on" for name, s in self.summary().items()
                if s["positions"] and s["mean_error"] > self.threshold]
