"""Gemma's tokenizer (a ``tokenizers`` BPE), chat template (jinja2) and stop tokens.

A model folder's ``tokenizer.json`` is read with the ``tokenizers`` library
directly; a folder with only a SentencePiece ``tokenizer.model`` is converted
once through transformers. A GGUF file carries its vocabulary as metadata:
``tokenizer_from_gguf`` rebuilds the same BPE from it (merges recovered from
the vocabulary, as transformers' GGUF reader does), with no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import mlx.core as mx

from gemmalens.errors import CheckpointError, ConfigError

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
_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types


class Tokenizer:
    """Encodes prompts (plain or chat-formatted), decodes tokens, pads batches on the left.

    ``backend`` is a ``tokenizers.Tokenizer``; ``special`` maps ``bos_token``,
    ``eos_token``, ``pad_token`` to their strings (the chat template reads them).
    """

    def __init__(self, backend, chat_template: str | None = None, add_bos_token: bool = True,
                 special: Mapping[str, str] | None = None):
        self.backend = backend
        self.chat_template = chat_template or GEMMA_CHAT_TEMPLATE
        self.add_bos_token = add_bos_token
        self.special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", **(special or {})}
        self.pad_id = _id_or(backend, self.special["pad_token"], PAD_ID)
        self.bos_id = _id_or(backend, self.special["bos_token"], BOS_ID)
        self.stop_ids = frozenset(STOP_IDS)
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def format(self, prompt: str, chat: bool = False) -> str:
        """The text fed to the model: the prompt itself, or its chat rendering."""
        if not chat:
            return prompt
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return self._template.render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
                                     **self.special)

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        """Token ids of a prompt: one bos, then the (formatted) text (a chat rendering brings its own bos)."""
        if chat:
            return self.backend.encode(self.format(prompt, chat=True), add_special_tokens=False).ids
        ids = self.backend.encode(prompt, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.add_bos_token else ids

    def prompt_ids(self, prompt, chat: bool = False) -> list[int]:
        """A ``Prompt``'s token ids: those it was given, or its text encoded."""
        return list(prompt.tokens) if prompt.tokens is not None else self.encode(prompt.text, chat)

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def pad_batch(self, rows: Sequence[Sequence[int]]) -> tuple[mx.array, mx.array]:
        """Left-pads rows of ids: ``ids [B, T]`` int32 and ``pad [B]`` (leading pad count per row)."""
        width = max(len(r) for r in rows)
        pads = [width - len(r) for r in rows]
        ids = [[self.pad_id] * p + list(r) for p, r in zip(pads, rows)]
        return mx.array(ids, dtype=mx.int32), mx.array(pads, dtype=mx.int32)


def _id_or(backend, token: str, default: int) -> int:
    found = backend.token_to_id(token)
    return default if found is None else found


def _compile_template(source: str):
    """A chat template compiled as transformers compiles it (sandboxed, trimmed blocks, ``raise_exception``)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ConfigError(f"chat template: {message}")

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(source)


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
    folder = Path(folder)
    stored = _read_json(folder / "tokenizer_config.json")
    special = {key: _token_text(stored.get(key)) for key in ("bos_token", "eos_token", "pad_token")
               if _token_text(stored.get(key))}
    add_bos = settings.get("add_bos_token", stored.get("add_bos_token", True))
    return Tokenizer(_backend(folder), settings.get("chat_template") or _chat_template(folder, stored), bool(add_bos),
                     special)


def _backend(folder: Path):
    from tokenizers import Tokenizer as Backend

    file = folder / "tokenizer.json"
    try:
        if file.exists():
            return Backend.from_file(str(file))
        if (folder / "tokenizer.model").exists():  # SentencePiece only: transformers converts it (no torch needed)
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(folder)).backend_tokenizer
    except Exception as error:
        raise CheckpointError(f"{folder}: cannot load the tokenizer ({type(error).__name__}: {error}); the tokenizer "
                              "files are damaged: download the model again") from None
    raise CheckpointError(f"{folder}: no tokenizer.json or tokenizer.model beside config.json; copy the model's "
                          "tokenizer files into the folder")


def _chat_template(folder: Path, stored: Mapping[str, Any]) -> str | None:
    """The folder's own chat template (tokenizer_config.json, chat_template.jinja or chat_template.json), if any."""
    template = stored.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template:
        return template
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return _read_json(folder / "chat_template.json").get("chat_template")


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}:{error.lineno}:{error.colno}: invalid JSON ({error.msg})") from None


def tokenizer_from_gguf(tokens: Sequence[str], token_types: Sequence[int], folder: Path) -> None:
    """Writes tokenizer.json and tokenizer_config.json for a Gemma GGUF vocabulary into ``folder``.

    The BPE is Gemma's (byte fallback, spaces as ``▁``, no prefix space). The
    file lists no merges: every pair of vocabulary pieces that makes another
    piece is a merge, ranked by the merged piece's place in the vocabulary
    (Gemma's scores do not follow its merge order; the order of the file does),
    pieces of several spaces spelled with ``▁`` as the merges expect.
    """
    from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    spelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: index for index, token in enumerate(spelled)}
    merges = []
    for token in sorted(vocab, key=vocab.get):  # a piece spelled twice ranks by its last place, as in transformers
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        pairs.sort(key=lambda pair: (-len(pair[0]), vocab[pair[0]], vocab[pair[1]]))
        merges.extend(pairs)
    backend = Backend(BPE(vocab=vocab, merges=merges, unk_token=spelled[3], fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    # Control and user-defined pieces match whole in the raw text; a user-defined piece respelled above (runs of
    # spaces) is left to the merges, as transformers leaves it.
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, kind in zip(tokens, token_types) if kind == _CONTROL])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED and t in vocab])
    backend.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "bos_token": spelled[BOS_ID], "eos_token": spelled[EOS_ID], "pad_token": spelled[PAD_ID],
              "unk_token": spelled[3], "padding_side": "left", "chat_template": GEMMA_CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
