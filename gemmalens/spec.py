"""``RunSpec``: one run's settings, with their defaults, in one place.

The CLI builds it from its flags (their defaults come from here), writes it once as ``run_config.json``
(the results sink does, from ``run.start``), and the engine runs from it; ``--resume`` reads it back and
refuses a run whose settings differ in what changes the outputs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

POSITIONS = ("all", "prompt", "generated", "last")
WIRE_DTYPES = ("float32", "bfloat16")
CODECS = ("raw", "lz4", "lz4+shuffle")
DATASET_ROWS = ("token", "context")
RUN_CONFIG = "run_config.json"


@dataclass(frozen=True)
class RunSpec:
    """What a run generates and captures. Tuples hold the repeatable settings."""

    model: str | None = None  # None: the embedded Gemma 3 270M
    dtype: str | None = None  # None: float32 on the CPU, bfloat16 on a GPU
    max_tokens: int = 100
    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int | None = None
    repetition_penalty: float = 1.1
    seed: int | None = None  # None: drawn once and recorded
    batch_size: int = 4
    chat_mode: bool = False
    stop: tuple[str, ...] = ()
    prompts_file: str | None = None  # None: the built-in prompts
    corpus: str | None = None  # instead: a packed corpus's windows (gemmalens/corpus.py), for gemmalens harvest
    category: str | None = None  # one category of the prompts file (--process-by-group)
    save_activations: bool = False
    capture: tuple[str, ...] = ()  # empty with save_activations: every point
    exclude: tuple[str, ...] = ()
    layers: str | None = None
    positions: str = "all"
    wire_dtype: str | None = None  # None: the compute dtype
    interventions: tuple[dict, ...] = ()  # their records (gemmalens/interventions.py): arrays by path and SHA-256
    saes: tuple[str, ...] = ()  # attached SAEs: local folders or REPO_ID/FOLDER/SAE (engine/sae.py)
    codec: str = "lz4"
    output_dir: str | None = None  # where the results sink writes (informational)
    activations_dir: str | None = None  # where the npz archiver writes (informational)
    dataset: str | None = None  # where the dataset sink writes: a folder or fsspec URL (sinks/dataset.py)
    dataset_rows: str = "token"  # one row per token, or per window of `context` tokens
    context: int = 128
    dataset_points: tuple[str, ...] = ()  # the captured points the dataset takes (empty: every per-token one)

    # Settings that do not change what a prompt's outputs are: a resumed run may change them.
    FREE = ("batch_size", "codec", "output_dir", "activations_dir", "dataset")

    def __post_init__(self):
        for name in ("stop", "capture", "exclude", "interventions", "saes", "dataset_points"):
            object.__setattr__(self, name, tuple(getattr(self, name) or ()))
        if self.positions not in POSITIONS:
            raise ConfigError(f"positions {self.positions!r}: expected one of {', '.join(POSITIONS)}")
        if self.wire_dtype not in (None, *WIRE_DTYPES):
            raise ConfigError(f"wire dtype {self.wire_dtype!r}: expected one of {', '.join(WIRE_DTYPES)}")
        if self.dataset_rows not in DATASET_ROWS:
            raise ConfigError(f"dataset rows {self.dataset_rows!r}: expected one of {', '.join(DATASET_ROWS)}")
        if self.codec not in CODECS:
            raise ConfigError(f"codec {self.codec!r}: expected one of {', '.join(CODECS)}")

    @property
    def patterns(self) -> tuple[str, ...]:
        """The capture patterns in force: ``capture``, or every point when only ``save_activations`` is set."""
        return self.capture or (("*",) if self.save_activations else ())

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("stop", "capture", "exclude", "interventions", "saes", "dataset_points"):
            out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "run settings") -> "RunSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}")
        try:
            return cls(**values)
        except TypeError as error:
            raise ConfigError(f"{where}: {error}") from None

    def replace(self, **changes) -> "RunSpec":
        return dataclasses.replace(self, **changes)

    def differences(self, other: "RunSpec") -> list[str]:
        """The settings, other than the free ones, in which ``other`` differs: 'name (was X, now Y)'."""
        out = []
        for f in dataclasses.fields(self):
            if f.name in self.FREE:
                continue
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                out.append(f"{f.name} (was {mine!r}, now {theirs!r})")
        return out

    def write(self, folder: str | Path) -> Path:
        from .files import write_atomic

        path = Path(folder) / RUN_CONFIG
        write_atomic(path, (json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
        return path

    @classmethod
    def read(cls, folder: str | Path) -> "RunSpec":
        """The settings of the run in ``folder`` (its run_config.json)."""
        path = Path(folder) / RUN_CONFIG
        if not path.exists():
            raise ConfigError(f"{folder}: holds no earlier run ({RUN_CONFIG} missing)")
        return cls.read_file(path)

    @classmethod
    def read_file(cls, path: str | Path) -> "RunSpec":
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}:{error.lineno}:{error.colno}: invalid JSON ({error.msg})") from None
        return cls.from_dict(values, str(path))
