"""The one error hierarchy of fastkv; the CLI maps each class to an exit code and a one-line message."""


class FastKVError(Exception):
    """A failure while doing valid work (exit code 1)."""

    exit_code = 1


class InputError(FastKVError):
    """Bad input from the user: a document, an argument, a model path (exit code 2)."""

    exit_code = 2


class DocumentError(InputError):
    """A document that cannot be read as text."""


class ModelError(InputError):
    """A model that cannot be found, loaded or is not supported."""


class ContextOverflowError(InputError):
    """The prompt does not fit the model's context window."""


class CacheFileError(InputError):
    """A .fkv file that is not a valid cache, or does not belong to the loaded model."""


class MemoryLimitError(FastKVError):
    """The prefill would need more memory than the device has free (exit code 1)."""
