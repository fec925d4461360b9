"""ckptkit's MLflow backend: publishes the final model to MLflow, never resume checkpoints."""

import importlib.util
import sys

__version__ = "0.4.0"


def _require_this_ckptkit(plugin: str) -> None:
    """Stop the import with the cause when the ``ckptkit`` on the path is another project.

    The public package index's ``ckptkit`` is an unrelated checkpoint inspect/convert tool that
    imports under the same name; without this check it surfaces as a bare "No module named
    'ckptkit.<something>'" from deep inside the plugin. ``ckptkit.hookspecs`` (the plugin
    contract) is what marks ours.
    """
    try:
        ours = importlib.util.find_spec("ckptkit.hookspecs") is not None
    except ModuleNotFoundError:
        raise ImportError(f"{plugin} needs ckptkit, which is not installed; see docs/install.md in "
                          "the ckptkit repository") from None
    if not ours:
        found = sys.modules["ckptkit"]
        where = getattr(found, "__file__", None) or list(found.__path__)
        version = getattr(found, "__version__", "unknown")
        raise ImportError(
            f"{plugin} needs ckptkit, the role-routed training checkpoint library, but the 'ckptkit' "
            f"found at {where} (version {version}) is a "
            "different project of the same name, such as the public package index's unrelated "
            "checkpoint inspect/convert tool. Run `pip uninstall ckptkit`, then install ckptkit from "
            "a checkout, a git URL or your team's index (--index-url, never --extra-index-url); see "
            "docs/install.md in the ckptkit repository")


_require_this_ckptkit("ckptkit-mlflow")

from .backend import FINAL_URI_PARAM, MlflowBackend, redact  # noqa: E402

__all__ = ["FINAL_URI_PARAM", "MlflowBackend", "redact"]
