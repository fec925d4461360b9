"""roles.resume.write_threads: one state split over several files, written at the same time."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import fsspec
import pytest
import torch

from ckpt_helpers import assert_same_state, local_config, make_model, rewrite_manifest, train_step
from ckptkit import CheckpointManager, ConfigError, CorruptCheckpointError
from ckptkit import split
from ckptkit.cli import main
from ckptkit.manifest import MANIFEST_NAME
from ckptkit.plugin import FileBackend, Payload, PayloadFile
from ckptkit.publish import find_source, publish

STEP2 = "scratch/exp/step-0000000002"


def _config(tmp_path, threads, **resume):
    cfg = local_config(tmp_path)
    cfg["roles"]["resume"].update(write_threads=threads, **resume)
    return cfg


def _trained(seed=0, steps=2):
    model, opt = make_model(seed)
    for _ in range(steps):
        train_step(model, opt)
    return model, opt


def _state(model, opt):
    from ckptkit import gather
    return gather.resume_state(model, opt)


def _paths(part):
    return sorted(p for p, _ in split._leaves(part, ()))


def test_parts_are_whole_tensors_of_about_equal_bytes_and_merge_back():
    model, opt = _trained()
    state = _state(model, opt)
    parts = split.split(state, 4)
    assert len(parts) == 4
    leaves = [_paths(p) for p in parts]
    everything = sorted(p for ps in leaves for p in ps)
    assert everything == _paths(state), "every leaf in exactly one part"
    sizes = [sum(t.nbytes for _, t in split._leaves(p, ()) if torch.is_tensor(t)) for p in parts]
    largest = max(t.nbytes for _, t in split._leaves(state, ()) if torch.is_tensor(t))
    assert max(sizes) - min(sizes) <= largest
    # Everything that is not model or optimizer tensors sits in part 0.
    assert "param_groups" in parts[0]["optimizer"] and all("param_groups" not in p.get("optimizer", {}) for p in parts[1:])
    assert_same_state(split.merge(parts, "here"), state)


def test_the_assignment_depends_only_on_keys_and_sizes():
    a = split.split(_state(*_trained(seed=0, steps=1)), 3)
    b = split.split(_state(*_trained(seed=7, steps=3)), 3)
    assert [_paths(p) for p in a] == [_paths(p) for p in b]


def test_tensors_sharing_storage_stay_in_one_part():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(64, 32)
    head = torch.nn.Linear(32, 64, bias=False)
    head.weight = emb.weight  # tied
    model = torch.nn.Sequential(emb, torch.nn.Linear(32, 32), head)
    state = {"model": model.state_dict()}
    parts = split.split(state, 4)
    holder = [i for i, p in enumerate(parts) if "0.weight" in p.get("model", {})]
    assert holder and "2.weight" in parts[holder[0]]["model"]


def test_more_threads_than_tensors_gives_one_part_per_tensor(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)  # two tensors, no optimizer
    ck = CheckpointManager.from_config(_config(tmp_path, 8))
    ck.save(step=2, model=model)
    ck.close()
    files = sorted(os.listdir(tmp_path / STEP2))
    assert files == [MANIFEST_NAME, "state-00-of-02.pt", "state-01-of-02.pt"]
    fresh = torch.nn.Linear(4, 3)
    ck = CheckpointManager.from_config(_config(tmp_path, 8))
    assert ck.restore(model=fresh).step == 2
    assert_same_state(fresh.state_dict(), model.state_dict())
    ck.close()


class _Versioned(torch.nn.Module):
    """A module whose version 2 stores ``w`` transposed against version 1, and converts what
    version 1 saved when it loads it, as torch's own modules do with ``_version``."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(48, 32))
        self.b = torch.nn.Parameter(torch.randn(32))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        if local_metadata.get("version", 1) < 2 and prefix + "w" in state_dict:
            state_dict[prefix + "w"] = state_dict[prefix + "w"].t()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


@pytest.mark.parametrize("threads, is_async", [(3, False), (1, True), (3, True)])
def test_a_split_or_staged_state_keeps_the_module_versions(tmp_path, threads, is_async):
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Versioned(), torch.nn.Linear(32, 8))
    ck = CheckpointManager.from_config(_config(tmp_path, threads, **{"async": is_async}))
    ck.save(step=2, model=model)
    ck.close()
    assert sorted(os.listdir(tmp_path / STEP2))[-1] == split.part_names(threads)[-1]
    merged = split.merge(split.split({"model": model.state_dict()}, 3), "here")
    assert merged["model"]._metadata == model.state_dict()._metadata
    fresh = torch.nn.Sequential(_Versioned(), torch.nn.Linear(32, 8))
    ck = CheckpointManager.from_config(_config(tmp_path, 1))
    assert ck.restore(model=fresh).step == 2
    assert_same_state(fresh.state_dict(), model.state_dict())
    ck.close()


@pytest.mark.parametrize("is_async", [False, True])
def test_a_split_save_restores_bit_identical(tmp_path, is_async):
    model, opt = _trained()
    ck = CheckpointManager.from_config(_config(tmp_path, 4, **{"async": is_async}))
    ck.save(step=2, epoch=1, model=model, optimizer=opt, extra={"note": {"a": 1}}, rank_extra={"seed": 5})
    ck.close()
    folder = tmp_path / STEP2
    names = split.part_names(4)
    assert names == ["state-00-of-04.pt", "state-01-of-04.pt", "state-02-of-04.pt", "state-03-of-04.pt"]
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {*names, "extra.pt"}
    for name in names:
        assert manifest["files"][name]["size"] == (folder / name).stat().st_size
        part = torch.load(folder / name, weights_only=True)  # each part loads on its own
        assert isinstance(part, dict) and part
    fresh, fresh_opt = make_model(seed=3)
    ck = CheckpointManager.from_config(_config(tmp_path, 1))  # a reader needs no write_threads
    restored = ck.restore(model=fresh, optimizer=fresh_opt)
    assert (restored.step, restored.extra, restored.rank_extra) == (2, {"note": {"a": 1}}, {"seed": 5})
    assert_same_state(fresh.state_dict(), model.state_dict())
    assert_same_state(fresh_opt.state_dict(), opt.state_dict())
    ck.close()


def test_verify_export_publish_and_peek_read_a_split_checkpoint(tmp_path, capsys):
    model, opt = _trained()
    cfg = _config(tmp_path, 3)
    ck = CheckpointManager.from_config(cfg)
    ck.save(step=2, model=model, optimizer=opt, extra={"cfg": {"width": 16}})
    assert ck.peek().extra == {"cfg": {"width": 16}}
    ck.export(tmp_path / "out.pt")
    assert_same_state(torch.load(tmp_path / "out.pt", weights_only=True)["model"], model.state_dict())
    result = publish(ck, find_source(ck, step=2))
    assert result.ok
    body = torch.load(tmp_path / "published/exp/final/final_model.pt", weights_only=True)
    assert_same_state(body["model"], model.state_dict())
    ck.close()
    config_file = tmp_path / "ckptkit.yaml"
    config_file.write_text(json.dumps(cfg))
    assert main(["verify", str(config_file)]) == 0
    capsys.readouterr()


def test_an_incomplete_set_of_parts_is_corrupt(tmp_path):
    model, opt = _trained()
    ck = CheckpointManager.from_config(_config(tmp_path, 3))
    ck.save(step=2, model=model, optimizer=opt)
    ref = ck.list_checkpoints()[0]
    folder = tmp_path / STEP2
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    os.remove(folder / "state-01-of-03.pt")
    rewrite_manifest(folder, files={n: e for n, e in manifest["files"].items() if n != "state-01-of-03.pt"})
    with pytest.raises(CorruptCheckpointError, match="incomplete or mixed set of state parts"):
        ck.verify(ref)
    fresh, fresh_opt = make_model(seed=3)
    with pytest.raises(CorruptCheckpointError, match="state-00-of-03.pt, state-02-of-03.pt"), \
            pytest.warns(RuntimeWarning, match="skipped"):
        ck.restore(model=fresh, optimizer=fresh_opt)
    ck.close()


def test_state_files_names_what_is_wrong():
    assert split.state_files(["state.pt", "extra.pt"], "m") == ["state.pt"]
    assert split.state_files(["state-01-of-02.pt", "state-00-of-02.pt"], "m") == ["state-00-of-02.pt",
                                                                                  "state-01-of-02.pt"]
    with pytest.raises(CorruptCheckpointError, match="lists both state.pt and state parts"):
        split.state_files(["state.pt", "state-00-of-02.pt", "state-01-of-02.pt"], "m")
    with pytest.raises(CorruptCheckpointError, match="lists no state file"):
        split.state_files(["extra.pt"], "m")
    with pytest.raises(CorruptCheckpointError, match="incomplete or mixed"):
        split.state_files(["state-00-of-02.pt", "state-01-of-03.pt", "state-02-of-03.pt"], "m")


def test_parts_that_overlap_are_corrupt():
    with pytest.raises(CorruptCheckpointError, match="two state parts both hold 'model/w'"):
        split.merge([{"model": {"w": torch.zeros(1)}}, {"model": {"w": torch.ones(1)}}], "ckpt")


def test_concurrent_saves_leave_torchs_crc32_option_as_it_was(tmp_path):
    get, set_ = torch.serialization.get_crc32_options, torch.serialization.set_crc32_options
    before = get()
    model, opt = _trained()
    ck = CheckpointManager.from_config(_config(tmp_path, 4))
    try:
        for value in (True, False):
            set_(value)
            ck.save(step=4 - 2 * value, model=model, optimizer=opt, force=True)
            assert get() is value
    finally:
        set_(before)
        ck.close()


@pytest.mark.parametrize("value, message", [
    (0, "must be an integer >= 1, got 0"),
    (65, "at most 64, got 65"),
    ("4", "must be an integer >= 1, got '4'"),
])
def test_write_threads_is_checked(tmp_path, value, message):
    with pytest.raises(ConfigError, match=f"roles.resume.write_threads: {message}"):
        CheckpointManager.from_config(_config(tmp_path, value))


def test_write_threads_with_dcp_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="roles.resume.write_threads: splits a format: torch state"):
        CheckpointManager.from_config(_config(tmp_path, 2, format="dcp"))


class _Serial(FileBackend):
    """A third-party backend over a client that one thread at a time may use (the default)."""


class _Concurrent(FileBackend):
    concurrent_writes = True


@pytest.mark.parametrize("cls, most", [(_Serial, 1), (_Concurrent, 4)])
def test_a_file_backend_writes_files_at_once_only_when_its_client_allows(cls, most):
    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    root = f"/parallel-{uuid.uuid4().hex[:8]}"
    backend = cls("third", fs, root)
    lock, now, seen = threading.Lock(), [0], []
    # Four writes at once must all be in flight together: they meet at a barrier (no timing
    # luck). Written one at a time, the first waits alone: the barrier breaks after its timeout
    # and the save fails. A serial backend is given a moment for a second write to overlap.
    meet = threading.Barrier(most, timeout=30) if most > 1 else None

    def write(f):
        with lock:
            now[0] += 1
            seen.append(now[0])
        if meet is not None:
            meet.wait()
        else:
            time.sleep(0.05)
        f.write(b"part")
        with lock:
            now[0] -= 1

    files = tuple(PayloadFile(f"state-{i:02d}-of-04.pt", write=write) for i in range(4))
    payload = Payload(run_name="r", step=1, epoch=None, format="torch", files=files, concurrency=4)
    try:
        ref = backend.save_resume(run_name="r", step=1, payload=payload)
        assert max(seen) == most
        assert set(backend.read_manifest(ref=ref).files) == {pf.name for pf in files}
    finally:
        fs.rm(root, recursive=True)  # the memory filesystem is one store for the whole process
