"""Gemma's tokenizer (transformers' fast tokenizer), chat template and stop tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import mlx.core as mx

from .errors import CheckpointError, ConfigError

# Gemma 3's turn format; no system role, so system text opens the first user turn.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set preamble = messages[0]['content'] + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set preamble = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (preamble if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

PAD_ID, EOS_ID, BOS_ID, END_OF_TURN_ID = 0, 1, 2, 106
STOP_IDS = (EOS_ID, END_OF_TURN_ID)
TOKENIZER_KEYS = ("padding_side", "chat_template", "add_bos_token")


class Tokenizer:
    """Encodes prompts (plain or chat-formatted), decodes tokens, pads batches on the left."""

    def __init__(self, hf, chat_template: str | None = None, add_bos_token: bool = True):
        self.hf = hf
        self.chat_template = chat_template or getattr(hf, "chat_template", None) or GEMMA_CHAT_TEMPLATE
        self.add_bos_token = add_bos_token
        self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else PAD_ID
        self.bos_id = hf.bos_token_id if hf.bos_token_id is not None else BOS_ID
        self.stop_ids = frozenset(STOP_IDS)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def format(self, prompt: str, chat: bool = False) -> str:
        """The text fed to the model: the prompt itself, or its chat rendering."""
        if not chat:
            return prompt
        messages = [{"role": "user", "content": prompt}]
        return self.hf.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        """Token ids of a prompt: one bos, then the (formatted) text."""
        if chat:
            return list(self.hf(self.format(prompt, chat=True), add_special_tokens=False)["input_ids"])
        ids = list(self.hf(prompt, add_special_tokens=False)["input_ids"])
        return [self.bos_id, *ids] if self.add_bos_token else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def pad_batch(self, rows: Sequence[Sequence[int]]) -> tuple[mx.array, mx.array]:
        """Left-pads rows of ids: ``ids [B, T]`` int32 and ``pad [B]`` (leading pad count per row)."""
        width = max(len(r) for r in rows)
        pads = [width - len(r) for r in rows]
        ids = [[self.pad_id] * p + list(r) for p, r in zip(pads, rows)]
        return mx.array(ids, dtype=mx.int32), mx.array(pads, dtype=mx.int32)


def load_tokenizer(folder: Path, tokenizer_config: Mapping[str, Any] | None = None) -> Tokenizer:
    """The tokenizer of a model folder, with validated user settings."""
    settings = dict(tokenizer_config or {})
    unknown = sorted(set(settings) - set(TOKENIZER_KEYS))
    if unknown:
        raise ConfigError(
            f"tokenizer_config: unknown key(s) {', '.join(map(repr, unknown))}; valid keys are {', '.join(TOKENIZER_KEYS)}"
        )
    side = settings.get("padding_side", "left")
    if side != "left":
        raise ConfigError(
            f"tokenizer_config: padding_side {side!r} is not supported; batched generation pads on the left"
        )
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(folder), padding_side="left")
    except Exception as error:
        raise CheckpointError(
            f"{folder}: cannot load the tokenizer ({type(error).__name__}: {error}); expected tokenizer.json or "
            "tokenizer.model beside config.json"
        ) from None
    return Tokenizer(hf, settings.get("chat_template"), bool(settings.get("add_bos_token", True)))
