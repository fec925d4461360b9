"""docs/plugins.md's Example 2 and its conformance sample, run as written.

The type is built from the page's own code block, and the page's test class from its sample,
so the whole storage contract runs against what a plugin author copies.
"""

from __future__ import annotations

import pathlib
import re
import sys
import types

import pytest

DOCS = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()


def _block_after(heading: str, starts: str) -> str:
    """The first python code block after ``heading`` whose text starts with ``starts``."""
    section = DOCS[DOCS.index(heading):]
    for code in re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL):
        if code.startswith(starts):
            return code
    raise AssertionError(f"docs/plugins.md has no python block starting {starts!r} after {heading!r}")


_module = types.ModuleType("ckptkit_fsspec")
_example = compile(_block_after("## Example 2", "# src/ckptkit_fsspec/__init__.py"), "docs/plugins.md: Example 2", "exec")
exec(_example, _module.__dict__)  # noqa: S102 - the page's own code
sys.modules["ckptkit_fsspec"] = _module
# Defines TestFsspecBackend here, for pytest to collect: every test of ResumeBackendTests.
_sample = compile(_block_after("## Testing a backend", "# tests/test_conformance.py of ckptkit-fsspec"),
                  "docs/plugins.md: the conformance sample", "exec")
exec(_sample, globals())  # noqa: S102 - the page's own code


def test_the_sample_is_the_page_s_own_type_over_a_plain_disk(tmp_path):
    backend = _module.FsspecBackend.from_config("mine", {"path": f"file://{tmp_path}/root"})
    assert backend.needs_folders and "TestFsspecBackend" in globals()
    memory = _module.FsspecBackend.from_config("mem", {"path": "memory://ckpts"})
    assert not memory.needs_folders


@pytest.fixture(autouse=True, scope="module")
def _forget_the_module():
    yield
    sys.modules.pop("ckptkit_fsspec", None)
