"""Interventions as data: what to edit, where, for whom and when (docs/interventions.md).

An intervention is a JSON object with an ``op`` and a ``site`` (a capture point under ``model.``); ``parse``
checks one and loads its arrays, ``load_file`` reads a file of them (arrays as ``.npy`` paths relative to the
file), ``steer``/``ablate``/... build them in Python. ``record`` is the form a run stores (run_config.json, the
bus): every field, arrays as their path and SHA-256, from which ``parse`` rebuilds the same intervention (and
refuses an array file that changed). Nothing here knows the model: engine/editing.py checks sites and shapes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import ConfigError

OPS = ("add", "zero", "mean", "set", "clamp", "patch", "add_feature", "clamp_feature", "ablate_feature")
FEATURE_OPS = ("add_feature", "clamp_feature", "ablate_feature")  # name an attached SAE instead of a site
ARRAY_FIELD = {"add": "vector", "mean": "mean", "set": "value"}  # the op's array, by its JSON name
POSITION_WORDS = ("all", "prompt", "generated")
_FIELDS = {
    "add": {"vector", "scale"}, "zero": set(), "mean": {"mean"}, "set": {"value"}, "clamp": {"index", "value"},
    "patch": {"source", "source_prompt"},
    "add_feature": {"sae", "feature", "scale"}, "clamp_feature": {"sae", "feature", "value"},
    "ablate_feature": {"sae", "feature"},
}
_COMMON = {"op", "site", "heads", "prompts", "groups", "positions", "steps", "name"}


@dataclass(frozen=True, eq=False)
class Intervention:
    """One edit. ``array``: the op's vector/mean/value (None for zero, clamp, patch); ``value``: clamp's number.
    ``prompts``/``groups`` None: every row; ``steps`` ``(first, last)`` inclusive, step 0 the prompt pass, None:
    every step; ``positions`` a word of ``POSITION_WORDS`` or the positions (0 = the first prompt token)."""

    op: str
    site: str | None  # None for a feature op: its SAE's site
    array: np.ndarray | None = None
    array_path: str | None = None  # the .npy it came from, if any
    scale: float = 1.0
    heads: tuple[int, ...] | None = None
    index: int | None = None
    value: float | None = None
    source: str | None = None
    source_prompt: int | None = None
    prompts: tuple[int, ...] | None = None
    groups: tuple[str, ...] | None = None
    positions: str | tuple[int, ...] = "all"
    steps: tuple[int, int] | None = None
    name: str | None = None
    sae: str | None = None  # the feature ops': the attached SAE's name, and its feature
    feature: int | None = None
    digest: str = field(default="", init=False)

    def __post_init__(self):
        object.__setattr__(self, "digest", hashlib.sha256(
            json.dumps(self.record(with_path=False), sort_keys=True).encode()).hexdigest())

    @property
    def id(self) -> str:
        """A short name for this intervention: its ``name``, else the start of its digest."""
        return self.name or self.digest[:12]

    def applies_to(self, index: int, category: str | None) -> bool:
        """Whether the prompt ``index`` of ``category`` is one of this intervention's rows."""
        if self.prompts is not None and index not in self.prompts:
            return False
        return self.groups is None or category in self.groups

    def in_force(self, step: int) -> bool:
        return self.steps is None or self.steps[0] <= step <= self.steps[1]

    def record(self, with_path: bool = True) -> dict[str, Any]:
        """The JSON form: ``parse`` reads it back (arrays by path, checked against their SHA-256)."""
        out: dict[str, Any] = {"op": self.op}
        if self.site is not None:
            out["site"] = self.site
        if self.sae is not None:
            out["sae"], out["feature"] = self.sae, self.feature
        if self.name is not None:
            out["name"] = self.name
        if self.array is not None:
            key = ARRAY_FIELD[self.op]
            out[key] = self.array_path if with_path and self.array_path else None
            out[key + "_sha256"] = array_digest(self.array)
            out[key + "_shape"] = list(self.array.shape)
        if self.op in ("add", "add_feature"):
            out["scale"] = self.scale
        if self.op == "clamp":
            out["index"], out["value"] = self.index, self.value
        if self.op == "clamp_feature":
            out["value"] = self.value
        if self.op == "patch":
            out["source"], out["source_prompt"] = self.source, self.source_prompt
        for key in ("heads", "prompts", "groups"):
            if getattr(self, key) is not None:
                out[key] = list(getattr(self, key))
        out["positions"] = self.positions if isinstance(self.positions, str) else list(self.positions)
        if self.steps is not None:
            out["steps"] = list(self.steps)
        return out


def array_digest(array: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes."""
    array = np.ascontiguousarray(array)
    hasher = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    hasher.update(array.tobytes())
    return hasher.hexdigest()


def parse(item: Any, base: Path | None = None, where: str = "intervention") -> Intervention:
    """One intervention from its JSON form (arrays: a ``.npy`` path, relative to ``base``, or a list of numbers;
    in Python also a numpy array). Errors say which field is wrong and what it should be."""
    if isinstance(item, Intervention):
        return item
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected an object with 'op' and 'site', got {type(item).__name__}")
    op = item.get("op")
    if op not in OPS:
        raise ConfigError(f"{where}: 'op' must be one of {', '.join(OPS)}, got {op!r}")
    allowed = _COMMON | _FIELDS[op] | {f"{ARRAY_FIELD.get(op)}_sha256", f"{ARRAY_FIELD.get(op)}_shape"}
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} for op {op!r} "
                          f"(it takes {', '.join(sorted(_FIELDS[op] | _COMMON - {'op'}))})")
    values: dict[str, Any] = {"op": op, "name": _optional_str(item, "name", where)}
    if op in FEATURE_OPS:
        sae = item.get("sae")
        if not isinstance(sae, str) or not re.fullmatch(r"[A-Za-z0-9_]{1,80}", sae):
            raise ConfigError(f"{where}: op {op!r} needs 'sae', the name of an attached SAE, got {sae!r}")
        values.update(site=None, sae=sae, feature=_integer(item.get("feature"), f"{where}.feature", minimum=0))
        if op == "add_feature":
            values["scale"] = _number(item.get("scale", 1.0), f"{where}.scale")
        if op == "clamp_feature":
            values["value"] = _number(item.get("value"), f"{where}.value")
    else:
        site = item.get("site")
        if not isinstance(site, str) or not site.startswith("model."):
            raise ConfigError(f"{where}: 'site' must be a capture name under 'model.' (gemmalens names), got "
                              f"{site!r}")
        values["site"] = site
    if op in ARRAY_FIELD:
        key = ARRAY_FIELD[op]
        if key not in item or item[key] is None:
            raise ConfigError(f"{where}: op {op!r} needs '{key}' (a .npy path or a list of numbers)")
        values["array"], values["array_path"] = _array(item[key], base, f"{where}.{key}")
        expected = item.get(key + "_sha256")
        if expected is not None and array_digest(values["array"]) != expected:
            raise ConfigError(f"{where}.{key}: {values['array_path'] or 'the array'} is not the one the run used "
                              "(its SHA-256 differs): restore it, or start a new run")
    if op == "add":
        values["scale"] = _number(item.get("scale", 1.0), f"{where}.scale")
    if op == "clamp":
        values["index"] = _integer(item.get("index"), f"{where}.index", minimum=0)
        values["value"] = _number(item.get("value"), f"{where}.value")
    if op == "patch":
        source = item.get("source")
        if not isinstance(source, str) or not source:
            raise ConfigError(f"{where}: op 'patch' needs 'source', the folder of an earlier gemmalens run")
        path = Path(source) if base is None or Path(source).is_absolute() else base / source
        values["source"] = str(path.resolve())
        values["source_prompt"] = _integer(item.get("source_prompt"), f"{where}.source_prompt", minimum=0)
    if "heads" in item:
        values["heads"] = tuple(_integers(item["heads"], f"{where}.heads"))
    if "prompts" in item:
        values["prompts"] = tuple(_integers(item["prompts"], f"{where}.prompts"))
    if "groups" in item:
        groups = item["groups"]
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise ConfigError(f"{where}.groups: expected a list of category names")
        values["groups"] = tuple(groups)
    positions = item.get("positions", "all")
    if isinstance(positions, str):
        if positions not in POSITION_WORDS:
            raise ConfigError(f"{where}.positions: expected one of {', '.join(POSITION_WORDS)} or a list of "
                              f"positions, got {positions!r}")
        values["positions"] = positions
    else:
        values["positions"] = tuple(_integers(positions, f"{where}.positions"))
    if "steps" in item and item["steps"] is not None:
        steps = item["steps"]
        if (not isinstance(steps, list) or len(steps) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps)
                or steps[0] > steps[1]):
            raise ConfigError(f"{where}.steps: expected [first, last], steps counted from 0 (the prompt pass), "
                              f"first <= last, got {steps!r}")
        values["steps"] = (steps[0], steps[1])
    return Intervention(**values)


def parse_all(items: Any, base: Path | None = None, where: str = "interventions") -> list[Intervention]:
    if isinstance(items, (dict, Intervention)):
        items = [items]
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{where}: expected a list of interventions")
    return [parse(item, base, f"{where}[{i}]") for i, item in enumerate(items)]


def load_file(path: str | Path) -> list[Intervention]:
    """The interventions of a JSON file: a list of objects (or ``{"interventions": [...]}``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the interventions ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}:{error.lineno}:{error.colno}: invalid JSON ({error.msg})") from None
    if isinstance(data, dict) and "interventions" in data:
        data = data["interventions"]
    return parse_all(data, path.parent.resolve(), str(path))


def parse_steer(text: str, base: Path | None = None) -> Intervention:
    """``--steer SITE=FILE.npy[*SCALE]``."""
    site, eq, rest = text.partition("=")
    if not eq or not site or not rest:
        raise ConfigError(f"--steer {text!r}: expected SITE=FILE.npy or SITE=FILE.npy*SCALE")
    path, star, scale = rest.partition("*")
    try:
        factor = float(scale) if star else 1.0
    except ValueError:
        raise ConfigError(f"--steer {text!r}: the scale after '*' must be a number, got {scale!r}") from None
    return parse({"op": "add", "site": site, "vector": path, "scale": factor}, base, f"--steer {text!r}")


def parse_ablate(text: str) -> Intervention:
    """``--ablate SITE[:HEADS]``, HEADS as ``0,3-5``."""
    site, colon, heads = text.partition(":")
    item: dict[str, Any] = {"op": "zero", "site": site}
    if colon:
        try:
            item["heads"] = sorted({h for part in heads.split(",") for h in _span(part)})
        except ValueError:
            raise ConfigError(f"--ablate {text!r}: heads must be numbers and ranges such as 0,3-5") from None
    return parse(item, None, f"--ablate {text!r}")


def _span(part: str) -> range:
    low, _, high = part.strip().partition("-")
    return range(int(low), int(high or low) + 1)


def steer(site: str, vector, scale: float = 1.0, **where) -> Intervention:
    """``x + scale * vector`` at ``site`` (``where``: prompts, groups, positions, steps, name)."""
    return parse({"op": "add", "site": site, "vector": vector, "scale": scale, **where})


def ablate(site: str, heads: Sequence[int] | None = None, mean=None, **where) -> Intervention:
    """Zeroes ``site`` (or the listed heads); with ``mean``, replaces it by that mean instead."""
    item = {"op": "zero", "site": site, **where} if mean is None else {"op": "mean", "site": site, "mean": mean,
                                                                       **where}
    if heads is not None:
        item["heads"] = list(heads)
    return parse(item)


def set_value(site: str, value, **where) -> Intervention:
    return parse({"op": "set", "site": site, "value": value, **where})


def clamp(site: str, index: int, value: float, **where) -> Intervention:
    return parse({"op": "clamp", "site": site, "index": index, "value": value, **where})


def patch(site: str, source: str | Path, source_prompt: int, **where) -> Intervention:
    """The values of an archived gemmalens run's prompt ``source_prompt`` at the same positions."""
    return parse({"op": "patch", "site": site, "source": str(source), "source_prompt": source_prompt, **where})


def _array(value: Any, base: Path | None, where: str) -> tuple[np.ndarray, str | None]:
    if isinstance(value, np.ndarray):
        array, path = value, None
    elif isinstance(value, (list, tuple)):
        try:
            array, path = np.asarray(value, dtype=np.float32), None
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a list of numbers") from None
    elif isinstance(value, (str, Path)):
        path = Path(value) if base is None or Path(value).is_absolute() else base / value
        try:
            array = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise ConfigError(f"{where}: {path} does not exist") from None
        except (OSError, ValueError) as error:
            raise ConfigError(f"{where}: {path} is not a .npy array file ({error})") from None
        path = str(path.resolve())
    else:
        raise ConfigError(f"{where}: expected a .npy path or a list of numbers, got {type(value).__name__}")
    if array.dtype.kind not in "fiub" or array.ndim == 0 or array.size == 0:
        raise ConfigError(f"{where}: expected a non-empty numeric array, got {array.dtype} of shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ConfigError(f"{where}: holds NaN or infinite values")
    return array.astype(np.float32), path


def _optional_str(item: dict, key: str, where: str) -> str | None:
    value = item.get(key)
    if value is not None and (not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value)):
        raise ConfigError(f"{where}.{key}: expected up to 64 letters, digits, '_', '.', '-', got {value!r}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _integer(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{where}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _integers(value: Any, where: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{where}: expected a non-empty list of integers")
    return [_integer(v, f"{where}[{i}]", 0) for i, v in enumerate(value)]
