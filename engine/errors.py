"""Errors a user can act on. Each message says what, where, and what to do."""


class GemmalensError(Exception):
    """Base class: a user-facing problem, reported without a traceback by the CLI."""


class ConfigError(GemmalensError, ValueError):
    """A model or generation setting is invalid."""


class CheckpointError(GemmalensError):
    """A checkpoint is missing, unreadable, or does not match the model."""


class SelectionError(GemmalensError, ValueError):
    """A capture selection matches nothing or is malformed."""
