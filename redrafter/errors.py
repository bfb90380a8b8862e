"""User-facing errors. Each subclass is one kind of bad input; the message names the
offending value and the fix. The CLI turns any `RedrafterError` into one line and exit code 2."""


class RedrafterError(Exception):
    """Base class of every error caused by bad input (files, configs, arguments)."""


class CheckpointError(RedrafterError):
    """A checkpoint file is missing, corrupt, or does not match its config."""


class ConfigError(RedrafterError):
    """A config value is missing, of the wrong type, or out of range."""


class UnsupportedModelError(RedrafterError):
    """The checkpoint's architecture or model_type is not one we support."""


class DrafterMismatchError(RedrafterError):
    """The drafter does not fit the base model (hidden size or vocab differ)."""


class PromptError(RedrafterError):
    """A prompt is empty, has out-of-vocab ids, or does not fit the context."""


class TokenizerError(RedrafterError):
    """A tokenizer is missing or cannot be built from the checkpoint."""


class RuntimeUnavailableError(RedrafterError):
    """The requested runtime or device cannot run on this machine."""
