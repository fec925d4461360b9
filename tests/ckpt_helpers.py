"""Small models and configs shared by the core tests."""

from __future__ import annotations

import subprocess

import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from ckptkit import CheckpointManager
from ckptkit.local import LocalBackend


def make_model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
    x = torch.randn(8, 16)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def saved_run(cfg: dict, pm, steps, train: bool = True):
    """A manager of ``cfg`` that saved ``steps`` (each after a training step, with ``train``) and
    waited for its prune, with the model and optimizer it saved; the caller closes it."""
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    for step in steps:
        if train:
            train_step(model, opt)
        ck.save(step=step, model=model, optimizer=opt)
    ck.wait()
    return ck, model, opt


def local_config(root, *, every=1, keep=5, final=True, run_name="exp") -> dict:
    cfg = {
        "run_name": run_name,
        "backends": {"scratch": {"type": "local", "path": str(root / "scratch")}},
        "roles": {"resume": {"backends": ["scratch"], "every_n_steps": every, "keep_last": keep}},
    }
    if final:
        cfg["backends"]["published"] = {"type": "local", "path": str(root / "published")}
        cfg["roles"]["final"] = {"backends": ["published"]}
    return cfg


def assert_same_state(a, b) -> None:
    """Bit-identical nested state (tensors compared exactly, other values with ==)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    elif torch.is_tensor(a):
        assert torch.equal(a, b), "tensors differ"
    else:
        assert a == b


def rewrite_manifest(folder, **changes) -> None:
    """Rewrite a checkpoint's manifest as an attacker who controls the store would.

    Applies ``changes`` to its fields, refreshes the size and digest of every file it lists
    (so that files replaced in the folder pass verification), and seals it again the way
    ckptkit seals manifests. The one place that knows how manifests are sealed.
    """
    import json
    import os

    from ckptkit.hashing import algorithm_of, hash_stream
    from ckptkit.manifest import MANIFEST_NAME, Manifest

    path = os.path.join(os.fspath(folder), MANIFEST_NAME)
    with open(path) as f:
        data = json.load(f)
    data.pop("checksum", None)
    data.update(changes)
    for name, entry in data["files"].items():
        with open(os.path.join(os.fspath(folder), name), "rb") as f:
            entry["size"], entry["digest"] = hash_stream(f, algorithm_of(entry["digest"]))
    manifest = Manifest.from_dict(data)
    for seal in ("seal", "with_checksum"):
        if callable(getattr(manifest, seal, None)):
            manifest = getattr(manifest, seal)()
    with open(path, "wb") as f:
        f.write(manifest.to_json())


class DownFS(LocalFileSystem):
    """A filesystem whose server does not answer while ``down`` (a test may set it False to
    bring it back): every listing fails as a dropped connection would."""

    down = True

    def find(self, *args, **kwargs):
        if DownFS.down:
            raise ConnectionRefusedError(111, "Connection refused")
        return super().find(*args, **kwargs)


class DownBackend(LocalBackend):
    """The local backend over storage that cannot be reached (``DownFS``)."""

    @classmethod
    def from_config(cls, name, options):
        backend = super().from_config(name, options)
        backend.fs = DownFS()
        return backend


def torchrun_results(worker: str, nproc: int, scenario: str, workdir, *args: str, timeout: float = 180) -> list[dict]:
    """Run ``worker`` under torchrun (gloo, CPU) with ``scenario``, ``workdir`` and ``args``; each
    rank writes ``result-<scenario>-<rank>.json`` into ``workdir``: those, in rank order."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={port}",
           worker, scenario, str(workdir), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = []
    for rank in range(nproc):
        with open(os.path.join(workdir, f"result-{scenario}-{rank}.json")) as f:
            out.append(json.load(f))
    return out


def deflated_torch_file(floats: int) -> bytes:
    """What ``torch.save`` of ``floats`` zeros writes, with every record deflated (torch.save
    stores them as they are): a few KiB that unpack into 4 bytes per float."""
    import io
    import zipfile

    plain = io.BytesIO()
    torch.save(torch.zeros(floats), plain)
    packed = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(plain.getvalue())) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    return packed.getvalue()


def small_tmpfs(tmp_path, size: str):
    """For a fixture: a ``size`` filesystem that fills up for real (a tmpfs at ``tmp_path/tiny``;
    mounting needs root, else the test is skipped), unmounted afterwards."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)
