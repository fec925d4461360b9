"""ckptkit inside training frameworks that write checkpoints themselves.

Each submodule imports its framework and is installed with the extra of the same name:
``ckptkit.integrations.lightning`` with ``pip install "ckptkit[lightning]"``. Importing this
package imports no framework.
"""
