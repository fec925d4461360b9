"""Restore verifies every file before anything reaches the model: a local file is hashed before
it is loaded, or, where it cannot be memory-mapped, a large one on a second thread while it loads."""

from __future__ import annotations

import os
import threading
import warnings

import pytest
import torch

from ckptkit import CheckpointManager, CorruptCheckpointError, reading
from ckptkit.checkpoint import CheckpointRef
from ckptkit.hashing import hash_stream
from ckptkit.hookspecs import hookimpl
from ckptkit.local import LocalBackend
from ckptkit.plugins import make_plugin_manager
from ckptkit.manager import STATE_FILE
from ckptkit.manifest import FileEntry

from ckpt_helpers import assert_same_state, local_config, make_model, train_step

# Small: hashed before it is loaded; large (over 1 MiB): hashed on a second thread meanwhile
# where the file cannot be memory-mapped, else hashed first too.
SIZES = {"small": 16, "large": 512}


@pytest.fixture(params=[True, False], ids=["local-disk", "network-fs"])
def mapping(request, monkeypatch):
    """Restore as from a local disk (files memory-mapped) and as from a filesystem where they are not."""
    if not request.param:
        monkeypatch.setattr(reading, "mappable", lambda path: False)
    return request.param


def make(width: int, seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def snapshot(model, opt):
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": [{n: t.clone() if torch.is_tensor(t) else t for n, t in opt.state[p].items()}
                          for p in model.parameters() if p in opt.state]}


def save_steps(tmp_path, pm, width, steps):
    ck = CheckpointManager.from_config(local_config(tmp_path, final=False), plugin_manager=pm)
    model, opt = make(width, 0)
    states = {}
    for step in steps:
        train_step_wide(model, opt, width)
        ck.save(step=step, model=model, optimizer=opt)
        states[step] = snapshot(model, opt)
    ck.close()
    return states


def train_step_wide(model, opt, width):
    if width == 16:
        return train_step(model, opt)
    loss = model(torch.randn(8, width)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def state_file(tmp_path, step):
    return tmp_path / "scratch" / "exp" / f"step-{step:010d}" / STATE_FILE


@pytest.mark.parametrize("size", SIZES)
def test_a_flipped_byte_is_refused_and_nothing_is_applied(tmp_path, pm, size, mapping):
    width = SIZES[size]
    save_steps(tmp_path, pm, width, [0])
    path = state_file(tmp_path, 0)
    assert (path.stat().st_size > 1024 * 1024) == (size == "large")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # tensor bytes: torch.load reads them without complaint
    path.write_bytes(bytes(data))
    model, opt = make(width, 7)
    train_step_wide(model, opt, width)
    before = snapshot(model, opt)
    ck = CheckpointManager.from_config(local_config(tmp_path, final=False), plugin_manager=pm)
    with pytest.warns(RuntimeWarning, match="checksum"), \
            pytest.raises(CorruptCheckpointError, match="none could be restored"):
        ck.restore(model, opt)
    assert_same_state(snapshot(model, opt), before)


@pytest.mark.parametrize("size", SIZES)
def test_a_tampered_pickle_counts_as_corrupt_and_the_older_one_is_restored(tmp_path, pm, size, mapping):
    """A changed global name in the pickle makes the load refuse it as unsafe, which is never
    skipped; but the file also fails its checksum, and that decides: skipped, older restored."""
    width = SIZES[size]
    states = save_steps(tmp_path, pm, width, [0, 1])
    path = state_file(tmp_path, 1)
    data = path.read_bytes()
    assert b"_rebuild_tensor_v2" in data
    path.write_bytes(data.replace(b"_rebuild_tensor_v2", b"_rebuild_tensor_v9"))
    model, opt = make(width, 7)
    ck = CheckpointManager.from_config(local_config(tmp_path, final=False), plugin_manager=pm)
    with pytest.warns(RuntimeWarning, match=r"step-0000000001.*checksum"):
        restored = ck.restore(model, opt)
    assert restored.step == 0
    assert_same_state(snapshot(model, opt), states[0])


class _Held:
    """A file of a checkpoint whose first read waits until the test lets it go."""

    def __init__(self, f, backend):
        self.f, self.backend = f, backend

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
        self.backend.closed.set()

    def readinto(self, buf):
        self.backend.entered.set()
        assert self.backend.release.wait(60), "the test never let the read go"
        return self.f.readinto(buf)


class _HeldRead(LocalBackend):
    """The local backend; the read of one file of step 1 (``held``) waits for ``release``."""

    held: str | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.entered, self.release, self.closed = threading.Event(), threading.Event(), threading.Event()

    @hookimpl
    def open_file(self, ref, name):
        f = super().open_file(ref=ref, name=name)
        return _Held(f, self) if ref.step == 1 and name == self.held else f


def test_a_failed_check_waits_for_the_other_files_hashes_before_restore_goes_on(tmp_path, monkeypatch):
    """When one file of a checkpoint fails its check, the hashes of its other files still running
    on the hash threads are waited for: restore falls back only once nothing reads the skipped
    checkpoint any more (no open file, no hash thread left reading it, no error left unseen).
    Where the files cannot be mapped, as their hashes then run on the hash threads; a mapped
    file is hashed by the thread that loads it."""
    monkeypatch.setattr(reading, "mappable", lambda path: False)
    cfg = local_config(tmp_path, final=False)
    cfg["roles"]["resume"]["write_threads"] = 2
    ck = CheckpointManager.from_config(cfg)
    model = torch.nn.Sequential(torch.nn.Linear(600, 600), torch.nn.Linear(600, 600))
    for step in range(2):
        ck.save(step=step, model=model)
    ck.close()
    folder = tmp_path / "scratch/exp/step-0000000001"
    parts = sorted(folder.glob("state-*-of-02.pt"), key=lambda p: (p.stat().st_size, p.name))
    assert len(parts) == 2 and parts[0].stat().st_size > 1024 * 1024, "both hashed on the hash threads"
    data = bytearray(parts[0].read_bytes())  # checked first: the smaller one
    data[len(data) // 2] ^= 0xFF
    parts[0].write_bytes(bytes(data))

    pm = make_plugin_manager(autoload=False)
    pm.add_backend_type("heldread", _HeldRead)
    cfg["backends"]["scratch"]["type"] = "heldread"
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    backend = ck.router.instances["scratch"]
    backend.held = parts[1].name
    out: dict = {}

    def restore():
        with warnings.catch_warnings(record=True):
            try:
                out["result"] = ck.restore(torch.nn.Sequential(torch.nn.Linear(600, 600), torch.nn.Linear(600, 600)))
            except BaseException as exc:  # noqa: BLE001  (handed to the test)
                out["error"] = exc

    thread = threading.Thread(target=restore, daemon=True)
    thread.start()
    try:
        assert backend.entered.wait(20), "the held file's hash started"
        thread.join(0.5)
        assert thread.is_alive() and not backend.closed.is_set(), \
            f"restore went on while a hash of the skipped checkpoint still read it: {out}"
    finally:
        backend.release.set()
    thread.join(20)
    assert not thread.is_alive() and out.get("result") is not None and out["result"].step == 0, out
    assert backend.closed.is_set()
    ck.close()


def test_a_file_whose_metadata_alone_changes_during_a_restore_is_not_skipped(tmp_path, pm, monkeypatch):
    """A chmod or a backup's hard link moves a file's change time: the intact newest checkpoint
    was skipped as changed, and the training resumed from the step before saved over it."""
    ck = CheckpointManager.from_config(local_config(tmp_path, final=False), plugin_manager=pm)
    model, opt = make_model()
    for step in (1, 2):
        ck.save(step=step, model=model, optimizer=opt)
    ck.wait()
    newest = tmp_path / "scratch/exp/step-0000000002" / STATE_FILE
    load = reading.load

    def load_beside_a_backup(path, *args, **kwargs):
        os.link(path, tmp_path / "backup.pt")  # the hard link a backup tool makes as it goes
        os.chmod(path, 0o640)
        return load(path, *args, **kwargs)

    monkeypatch.setattr(reading, "load", load_beside_a_backup)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ck.restore(model, opt).step == 2
    ck.close()
    assert (tmp_path / "backup.pt").stat().st_nlink == 2 and newest.stat().st_nlink == 2


def test_a_write_that_sets_the_time_back_is_still_a_change(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 1000)
    with open(path, "rb") as f:
        size, digest = hash_stream(f)
    entry = FileEntry(size=size, digest=digest)
    ref = CheckpointRef(backend="b", run_name="r", step=1, path=str(tmp_path), uri=f"file://{tmp_path}")
    before = reading.identity(str(path), ref)
    assert not reading.changed(str(path), ref, before, entry)
    st = path.stat()
    with open(path, "r+b") as f:
        f.write(b"b")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert reading.changed(str(path), ref, before, entry)
