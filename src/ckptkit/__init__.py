"""ckptkit: PyTorch training checkpoints stored by role.

Resume checkpoints go to the backends declared for resuming and are pruned to the last K;
the final model goes once to the backends declared for publishing.
"""

__version__ = "0.4.0"

from .hookspecs import hookimpl  # noqa: E402
from .roles import Role  # noqa: E402
from .errors import (  # noqa: E402
    BackendError,
    CheckpointError,
    CheckpointNotFoundError,
    CkptkitError,
    CollectiveTimeoutError,
    ConfigError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    LocalWriteError,
    PluginError,
    PruneError,
    PublishError,
    RanksDisagreeError,
    RanksOutOfStepError,
    RunConflictError,
    SaveError,
    StorageFullError,
    StorageUnavailableError,
    UnsafeCheckpointError,
    UnstorableStateError,
)
from .config import Config  # noqa: E402
from .manager import CheckpointManager, Restored  # noqa: E402
from .rng import RngState  # noqa: E402

__all__ = [
    "BackendError",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CkptkitError",
    "CollectiveTimeoutError",
    "Config",
    "ConfigError",
    "CorruptCheckpointError",
    "IncompatibleCheckpointError",
    "LocalWriteError",
    "PluginError",
    "PruneError",
    "PublishError",
    "RanksDisagreeError",
    "RanksOutOfStepError",
    "Restored",
    "RngState",
    "RunConflictError",
    "Role",
    "SaveError",
    "StorageFullError",
    "StorageUnavailableError",
    "UnsafeCheckpointError",
    "UnstorableStateError",
    "hookimpl",
]
