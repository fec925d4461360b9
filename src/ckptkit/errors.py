"""Exceptions raised by ckptkit. Each one names what failed and says what to do."""


class CkptkitError(Exception):
    """Base class of every error ckptkit raises on purpose."""


class ConfigError(CkptkitError, ValueError):
    """The configuration is invalid; raised before any training step."""


class PluginError(CkptkitError):
    """A backend plugin could not be loaded or does not fit the hook specifications."""


class BackendError(CkptkitError):
    """A backend failed to store, list, read or delete a checkpoint."""

    def __init__(self, backend: str, message: str):
        self.backend = backend
        super().__init__(f"backend {backend!r}: {message}")


class CheckpointError(CkptkitError):
    """A stored checkpoint is missing, corrupt or cannot be loaded safely."""


class SaveError(CkptkitError):
    """A save did not reach every backend declared for its role.

    ``failures`` maps each backend name that failed to its exception; ``saved`` lists the
    references that did commit, so nothing that was stored is lost from view.
    """

    def __init__(self, message: str, failures: dict, saved: list):
        self.failures = failures
        self.saved = saved
        super().__init__(message)


class PublishError(SaveError):
    """The final model did not reach every final backend; it stays where it was saved."""
