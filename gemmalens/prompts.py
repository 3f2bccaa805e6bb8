"""Prompt sets: the seed's nested JSON, a flat list, or ``{category: [prompts]}``; validated with places."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import PromptFileError


@dataclass(frozen=True)
class Prompt:
    index: int
    text: str
    category: str | None = None
    subcategory: str | None = None
    tokens: tuple[int, ...] | None = None  # given token ids (a corpus window, gemmalens/corpus.py): text unused

    def to_dict(self) -> dict[str, Any]:
        """The prompt as run.start lists it (given token ids are left out: each result carries them)."""
        return {k: v for k, v in asdict(self).items() if k != "tokens"}


DEFAULT_PROMPTS = {
    "knowledge": {
        "science": ["Explain why the sky is blue in two sentences.", "What is photosynthesis?"],
        "history": ["Who built the first printing press in Europe?"],
    },
    "reasoning": {
        "arithmetic": ["If a train travels 60 km in 45 minutes, what is its speed in km/h?"],
        "logic": ["All cats are animals. Some animals are black. Are all cats black?"],
    },
    "creative": {
        "poetry": ["Write a haiku about autumn leaves."],
        "story": ["Begin a short story about a lighthouse keeper."],
    },
    "code": {"python": ["Write a Python function that reverses a string."]},
}


def sample_prompts() -> dict[str, Any]:
    """The sample written by ``--create-sample-prompts``: several categories and subcategories."""
    return json.loads(json.dumps(DEFAULT_PROMPTS))


def parse_prompts(data: Any, where: str = "prompts") -> list[Prompt]:
    """Prompts from any accepted shape; every problem is reported with its place, all at once."""
    problems: list[str] = []
    found: list[tuple[str, str | None, str | None]] = []

    def take(items, place, category, subcategory):
        if not isinstance(items, list):
            problems.append(f"{where}: {place}: expected a list of prompts, got {type(items).__name__}")
            return
        for i, item in enumerate(items):
            spot = f"{place}[{i}]"
            if not isinstance(item, str):
                problems.append(f"{where}: {spot}: expected a string, got {json.dumps(item)}")
            elif not item.strip():
                problems.append(f"{where}: {spot}: empty prompt")
            elif (bad := _invalid_unicode(item)) is not None:
                problems.append(f"{where}: {spot}: not valid Unicode (a lone surrogate {item[bad]!r} at character "
                                f"{bad}); fix the text or its escapes")
            else:
                found.append((item, category, subcategory, spot))

    if isinstance(data, list):
        take(data, "$", None, None)
    elif isinstance(data, dict):
        if not data:
            problems.append(f"{where}: no prompts (the object is empty)")
        for category, value in data.items():
            if isinstance(value, dict):
                if not value:
                    problems.append(f"{where}: {category}: no subcategories")
                for subcategory, items in value.items():
                    take(items, f"{category}.{subcategory}", category, subcategory)
            else:
                take(value, category, category, None)
    else:
        problems.append(f"{where}: expected a list of prompts or an object of categories, got {type(data).__name__}")
    if problems:
        raise PromptFileError("\n".join(problems))
    if not found:
        raise PromptFileError(f"{where}: no prompts")
    seen: dict[str, str] = {}
    for text, _, _, spot in found:
        if text in seen:
            warnings.warn(f"{where}: {spot} duplicates {seen[text]}", stacklevel=2)
        seen.setdefault(text, spot)
    return [Prompt(i, text, category, sub) for i, (text, category, sub, _) in enumerate(found)]


def _invalid_unicode(text: str) -> int | None:
    """The index of the first character that UTF-8 cannot encode (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None


def load_prompts(path: str | Path) -> list[Prompt]:
    """Reads and validates a prompts file; JSON syntax errors give ``file:line:column``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptFileError(f"{path}: no such prompts file (create one with --create-sample-prompts {path})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PromptFileError(f"{path}: cannot read ({error})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise PromptFileError(f"{path}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}") from None
    return parse_prompts(data, str(path))


def by_category(prompts: list[Prompt]) -> dict[str, list[Prompt]]:
    groups: dict[str, list[Prompt]] = {}
    for prompt in prompts:
        groups.setdefault(prompt.category or "uncategorized", []).append(prompt)
    return groups
