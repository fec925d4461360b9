"""docs/plugins.md's Examples 1 and 2 and its conformance sample, run as written.

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


_archive = types.ModuleType("ckptkit_archive")
exec(compile(_block_after("## Example 1", "# src/ckptkit_archive/__init__.py"), "docs/plugins.md: Example 1", "exec"),
     _archive.__dict__)  # noqa: S102 - the page's own code

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


def test_example_1_streams_the_model_or_copies_only_the_bytes_that_were_committed(tmp_path):
    """The example copied ``pf.source`` without checking it against ``expected``, though the page
    says to, and wrote ``final_model.pt`` in place, where a crash left half a model under its name."""
    import attrs

    from ckptkit.checkpoint import Payload, PayloadFile
    from ckptkit.errors import CheckpointError
    from ckptkit.hashing import hash_stream
    from ckptkit.manifest import FileEntry

    backend = _archive.ArchiveBackend.from_config("arch", {"path": str(tmp_path / "arch")})
    streamed = Payload(run_name="r", step=3, epoch=None, format="torch", role="final",
                       files=(PayloadFile("final_model.pt", write=lambda f: f.write(b"the model")),))
    ref = backend.publish_final(run_name="r", payload=streamed)
    assert ref.step == 3 and (tmp_path / "arch" / "r" / "final_model.pt").read_bytes() == b"the model"

    committed = tmp_path / "committed.pt"
    committed.write_bytes(b"the model")
    with open(committed, "rb") as f:
        size, digest = hash_stream(f)
    copied = attrs.evolve(streamed, files=(PayloadFile("final_model.pt", source=str(committed),
                                                       expected=FileEntry(size=size, digest=digest)),))
    backend.publish_final(run_name="r2", payload=copied)
    assert (tmp_path / "arch" / "r2" / "final_model.pt").read_bytes() == b"the model"
    assert (tmp_path / "arch" / "r2" / "final_model.pt.digest").read_text() == digest + "\n"

    committed.write_bytes(b"the modem")  # changed since it was committed
    with pytest.raises(CheckpointError, match="is not the file that was committed"):
        backend.publish_final(run_name="r3", payload=copied)
    assert sorted(p.name for p in (tmp_path / "arch" / "r3").iterdir()) == []
