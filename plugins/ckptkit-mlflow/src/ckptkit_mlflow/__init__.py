"""ckptkit's MLflow backend: publishes the final model to MLflow, never resume checkpoints."""

from .backend import FINAL_URI_PARAM, MlflowBackend, redact

__all__ = ["FINAL_URI_PARAM", "MlflowBackend", "redact"]
