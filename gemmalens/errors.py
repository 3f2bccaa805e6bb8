"""Errors a user can act on. Each message says what, where, and what to do."""


class GemmalensError(Exception):
    """Base class: a user-facing problem, reported without a traceback by the CLI."""


class ConfigError(GemmalensError, ValueError):
    """A model or generation setting is invalid."""


class CheckpointError(GemmalensError):
    """A checkpoint is missing, unreadable, or does not match the model."""


class SelectionError(GemmalensError, ValueError):
    """A capture selection matches nothing or is malformed."""


class PromptFileError(GemmalensError, ValueError):
    """A prompts file is missing, not JSON, not in one of the accepted shapes, or holds unusable prompts."""


class AddressError(ConfigError):
    """A bus address that ZeroMQ would refuse, or one this command cannot use."""


class WireError(GemmalensError, ValueError):
    """A message on the bus that breaks the protocol (docs/protocol.md): ``kind`` names the rule it broke."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class SinkLost(GemmalensError):
    """A reliable subscriber of the run disconnected or stopped answering: what it should have written is
    incomplete."""


class FolderBusy(GemmalensError):
    """An output folder is locked by another gemmalens process."""
