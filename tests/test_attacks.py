"""A code-execution payload planted anywhere in a stored checkpoint never runs.

The attacker controls the store: they replace a file, then rewrite the manifest so that every
checksum matches. Each payload, unpickled the unsafe way, creates a marker file (proved by
``test_the_payload_runs_when_unpickled_unsafely``); each test proves the marker was not
created and that the refusal is typed, for every way ckptkit reads a checkpoint back.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import pickle
import re
import shlex
import struct

import pytest
import torch

import fsspec

from ckptkit import CheckpointManager, UnsafeCheckpointError, safeload, sharded
from ckptkit import errors as ckptkit_errors
from ckptkit.cli import main
from ckptkit.plugins import make_plugin_manager
from ckptkit.publish import find_source, publish, source_from_folder

from ckpt_helpers import deflated_torch_file, local_config, make_model, rewrite_manifest, train_step


class RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: os.PathLike):
        self.marker = os.fspath(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unicode(s: str) -> bytes:
    data = s.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def dotted_global_pickle(module: str, name: str, arg: str) -> bytes:
    """``module``'s attribute chain ``name`` called with ``arg``: protocol 4 resolves dotted names."""
    return (pickle.PROTO + b"\x04" + _unicode(module) + _unicode(name) + pickle.STACK_GLOBAL
            + _unicode(arg) + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)


def _metadata(folder):
    with open(folder / ".metadata", "rb") as f:
        return pickle.load(f)  # the test's own file, written by DCP a moment ago


def _write_metadata(folder, metadata) -> None:
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


# -- where a payload can be planted ---------------------------------------------------------

def plant_shard_bytes(folder, marker) -> None:
    """An optimizer ``param_groups`` item of a shard (a DCP bytes item) replaced by a payload of another length."""
    metadata = _metadata(folder)
    index = next(k for k in metadata.storage_data if k.fqn == "optimizer.param_groups.0.lr")
    info = metadata.storage_data[index]
    payload = torch_bytes(RunsCode(marker))
    shard = folder / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload)
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(payload))
    _write_metadata(folder, metadata)


def plant_metadata_global(folder, marker) -> None:
    """The DCP ``.metadata`` pickle carrying a payload among its own objects."""
    metadata = _metadata(folder)
    metadata.planner_data["optimizer.param_groups.0.lr"] = RunsCode(marker)
    _write_metadata(folder, metadata)


def plant_metadata_dotted(folder, marker) -> None:
    """A protocol-4 dotted name under a DCP module that reaches ``os.system``."""
    (folder / ".metadata").write_bytes(dotted_global_pickle(
        "torch.distributed.checkpoint.metadata", "os.system", f"touch {shlex.quote(os.fspath(marker))}"))


def plant_extra(folder, marker) -> None:
    torch.save({"early_stopping": RunsCode(marker)}, folder / "extra.pt")


def plant_state(folder, marker) -> None:
    state = torch.load(folder / "state.pt", weights_only=True)
    state["model"]["0.weight"] = RunsCode(marker)
    torch.save(state, folder / "state.pt")


# name: (format, plant, whether exporting or publishing the model reads the file)
PLACES = {
    "dcp-shard-bytes": ("dcp", plant_shard_bytes, True),
    "dcp-metadata": ("dcp", plant_metadata_global, True),
    "dcp-metadata-dotted": ("dcp", plant_metadata_dotted, True),
    "dcp-extra": ("dcp", plant_extra, False),
    "torch-state": ("torch", plant_state, True),
    "torch-extra": ("torch", plant_extra, False),
}


@dataclasses.dataclass
class Attacked:
    cfg: dict
    cfg_file: str
    marker: object
    reads_model: bool
    tmp_path: object
    folder: object
    format: str

    def manager(self) -> CheckpointManager:
        return CheckpointManager.from_config(self.cfg)


@pytest.fixture(params=sorted(PLACES))
def attacked(request, tmp_path):
    """Steps 0 and 1 saved; step 1 carries a payload and a manifest rewritten to match."""
    fmt, plant, reads_model = PLACES[request.param]
    cfg = local_config(tmp_path)
    cfg["roles"]["resume"]["format"] = fmt
    ck = CheckpointManager.from_config(cfg)
    model, opt = make_model()
    for step in (0, 1):
        train_step(model, opt)
        ck.save(step=step, epoch=0, model=model, optimizer=opt, extra={"early_stopping": {"best": 1.0}})
    ck.close()
    folder = tmp_path / "scratch" / "exp" / f"step-{1:010d}"
    marker = tmp_path / "PAYLOAD-RAN"
    plant(folder, marker)
    rewrite_manifest(folder)
    cfg_file = tmp_path / "ckptkit.yaml"
    cfg_file.write_text(json.dumps(cfg))
    yield Attacked(cfg, str(cfg_file), marker, reads_model, tmp_path, folder, fmt)
    # Whatever the test asserted, a payload that ran is a failure.
    assert not marker.exists(), "the planted payload ran"


def test_the_payload_runs_when_unpickled_unsafely(tmp_path):
    marker = tmp_path / "PAYLOAD-RAN"
    torch.load(io.BytesIO(torch_bytes(RunsCode(marker))), weights_only=False)
    assert marker.exists()
    marker.unlink()
    pickle.loads(dotted_global_pickle("torch.distributed.checkpoint.metadata", "os.system",
                                      f"touch {shlex.quote(os.fspath(marker))}"))
    assert marker.exists()
    marker.unlink()


def test_restore_refuses_and_does_not_fall_back_to_an_older_checkpoint(attacked):
    ck = attacked.manager()
    model, opt = make_model(seed=1)
    with pytest.raises(UnsafeCheckpointError) as info:
        ck.restore(model, opt)
    assert f"step-{1:010d}" in str(info.value)
    assert not attacked.marker.exists()
    ck.close()


def test_export_refuses(attacked):
    ck = attacked.manager()
    out = attacked.tmp_path / "model.pt"
    if attacked.reads_model:
        with pytest.raises(UnsafeCheckpointError):
            ck.export(out, step=1)
        assert not out.exists()
    else:  # the model's files are intact; export reads nothing else
        assert ck.export(out, step=1).step == 1
        assert set(torch.load(out, weights_only=True)["model"]) == set(make_model()[0].state_dict())
    assert not attacked.marker.exists()
    ck.close()


def test_cli_export_refuses(attacked, capsys):
    out = attacked.tmp_path / "model.pt"
    code = main(["export", attacked.cfg_file, "--out", str(out), "--step", "1"])
    err = capsys.readouterr().err
    assert not attacked.marker.exists()
    if attacked.reads_model:
        assert code == 1 and err.startswith("ckptkit: error:") and "nothing in it ran" in err.lower()
    else:
        assert code == 0


def test_publish_refuses(attacked):
    ck = attacked.manager()
    if attacked.reads_model:
        with pytest.raises(UnsafeCheckpointError):
            publish(ck, find_source(ck, step=1))
    else:
        assert publish(ck, find_source(ck, step=1)).ok
    assert not attacked.marker.exists()
    ck.close()


def test_cli_publish_refuses(attacked, capsys):
    code = main(["publish", attacked.cfg_file, "--step", "1"])
    err = capsys.readouterr().err
    assert not attacked.marker.exists()
    if attacked.reads_model:
        assert code == 1 and "nothing in it ran" in err.lower()
        assert not (attacked.tmp_path / "published" / "exp" / "final").exists()
    else:
        assert code == 0


def test_the_deep_check_refuses_without_reading_tensors(attacked):
    """``sharded.check`` and ``safeload.check``: what a deep verify runs on every file."""
    files = ["extra.pt"] if attacked.format == "dcp" else ["state.pt", "extra.pt"]
    with pytest.raises(UnsafeCheckpointError, match="nothing in it ran"):
        if attacked.format == "dcp":
            sharded.check(fsspec.filesystem("file"), str(attacked.folder), os.listdir(attacked.folder))
        for name in files:
            safeload.check(attacked.folder / name)
    assert not attacked.marker.exists()


def test_verify_refuses(attacked):
    ck = attacked.manager()
    ref = next(r for r in ck.list_checkpoints() if r.step == 1)
    with pytest.raises(UnsafeCheckpointError):
        ck.verify(ref)
    assert not attacked.marker.exists()
    ck.close()


def test_cli_verify_reports_the_unsafe_checkpoint(attacked, capsys):
    code = main(["verify", attacked.cfg_file, "--json"])
    rows = {r["step"]: r for r in json.loads(capsys.readouterr().out)}
    assert not attacked.marker.exists()
    assert code == 1 and rows[0]["ok"] and not rows[1]["ok"]
    assert "nothing in it ran" in rows[1]["detail"].lower()


# -- files of a sharded checkpoint that its manifest does not list ------------------------------

def _dcp_checkpoint(tmp_path, pm, seed, final=False):
    cfg = local_config(tmp_path / f"run{seed}", final=final)
    cfg["roles"]["resume"]["format"] = "dcp"
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model(seed=seed)
    train_step(model, opt)
    ck.save(step=1, model=model, optimizer=opt, extra={"seed": seed})
    ck.close()
    return cfg, tmp_path / f"run{seed}" / "scratch/exp/step-0000000001", model


def _unlisting(folder, drop):
    data = json.loads((folder / "manifest.json").read_text())
    files = {n: e for n, e in data["files"].items() if n not in drop}
    rewrite_manifest(folder, files=files)


@pytest.mark.parametrize("swap", [".metadata", "shards"])
def test_files_a_sharded_manifest_does_not_list_are_never_read(tmp_path, swap):
    """The attacker puts another model's metadata or shards in place and reseals the manifest
    without them: what it does not list was never verified, so no way of reading uses it."""

    cfg, folder, _ = _dcp_checkpoint(tmp_path, make_plugin_manager(autoload=False), seed=0)
    _, other, _ = _dcp_checkpoint(tmp_path, make_plugin_manager(autoload=False), seed=1)
    moved = [".metadata"] if swap == ".metadata" else [n for n in os.listdir(other) if n.endswith(".distcp")]
    if swap == "shards":
        moved.append(".metadata")  # the other model's shards, as its metadata places them
    for name in moved:
        (folder / name).write_bytes((other / name).read_bytes())
    _unlisting(folder, drop=moved if swap == ".metadata" else [n for n in moved if n != ".metadata"])
    if swap == "shards":
        rewrite_manifest(folder)  # the new .metadata listed, with its digest
    ck = CheckpointManager.from_config(cfg, plugin_manager=make_plugin_manager(autoload=False))
    fresh, opt = make_model(seed=2)
    with pytest.raises(ckptkit_errors.CorruptCheckpointError, match="does not list|lists no"):
        ck.restore(model=fresh, optimizer=opt)
    ref = ck.list_checkpoints()[0]
    with pytest.raises(ckptkit_errors.CorruptCheckpointError, match="does not list|lists no"):
        ck.verify(ref)
    with pytest.raises(ckptkit_errors.CorruptCheckpointError):
        ck.export(tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


# -- metadata that loads without running code and still does harm --------------------------

def _saved_metadata(tmp_path) -> bytes:
    _, folder, _ = _dcp_checkpoint(tmp_path, make_plugin_manager(autoload=False), 0)
    return (folder / ".metadata").read_bytes()


def test_metadata_that_changes_a_shared_enum_member_is_refused_and_undone(tmp_path):
    """Calling the allowed enum class gives the process's one member; BUILD on it would make
    every later save of the process write a value no load can read."""
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    original = _saved_metadata(tmp_path)
    body = original[2:]
    if body[:1] == pickle.FRAME:
        body = body[9:]
    gadget = (b"ctorch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\n" + pickle.BININT1 + b"\x00"
              + pickle.TUPLE1 + pickle.REDUCE + pickle.EMPTY_DICT + _unicode("_value_") + pickle.BININT1 + b"\x07"
              + pickle.SETITEM + pickle.BUILD + pickle.POP)
    member = _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT
    value = member.value
    with pytest.raises(UnsafeCheckpointError, match="TORCH_CONTIGUOUS_FORMAT"):
        sharded.read_metadata(io.BytesIO(original[:2] + gadget + body))
    assert member._value_ == value
    sharded.read_metadata(io.BytesIO(original))  # the file as DCP wrote it still reads


def test_metadata_placing_an_item_at_a_huge_list_index_is_refused_before_any_list_grows(tmp_path):
    metadata = pickle.loads(_saved_metadata(tmp_path))  # the test's own file, written by DCP a moment ago
    key = next(k for k in metadata.planner_data if k.startswith("model."))
    metadata.planner_data[key] = ("model", 10**10)
    with pytest.raises(ckptkit_errors.CorruptCheckpointError, match="places"):
        sharded.read_metadata(io.BytesIO(pickle.dumps(metadata)))


@pytest.mark.parametrize("how", ["restore", "export", "publish", "publish --from"])
def test_a_shard_replaced_between_its_check_and_its_load_is_refused(tmp_path, monkeypatch, how):
    """The files of a local ``dcp`` checkpoint are hashed, then read by DCP by name: one
    replaced in between (by a program writing into the folder) is found out after the read,
    and nothing read from it is used."""
    cfg, folder, _ = _dcp_checkpoint(tmp_path, make_plugin_manager(autoload=False), seed=0, final=True)
    _, other, _ = _dcp_checkpoint(tmp_path, make_plugin_manager(autoload=False), seed=1)
    shard = next(n for n in os.listdir(folder) if n.endswith(".distcp"))
    real = sharded.open_reader

    def open_reader(*args, **kwargs):  # runs after the check, before DCP reads the shards
        tmp = folder / "swap"
        tmp.write_bytes((other / shard).read_bytes())
        os.replace(tmp, folder / shard)
        return real(*args, **kwargs)

    monkeypatch.setattr(sharded, "open_reader", open_reader)
    ck = CheckpointManager.from_config(cfg, plugin_manager=make_plugin_manager(autoload=False))
    out = tmp_path / "model.pt"
    with pytest.raises(ckptkit_errors.CorruptCheckpointError, match="changed while it was being|no verified"):
        if how == "restore":
            fresh, opt = make_model(seed=2)
            ck.restore(model=fresh, optimizer=opt)
        elif how == "export":  # skips the checkpoint, as a damaged one
            with pytest.warns(RuntimeWarning, match="changed while it was being read"):
                ck.export(out, step=1)
        elif how == "publish":
            publish(ck, find_source(ck, step=1))
        else:
            publish(ck, source_from_folder(folder))
    assert not out.exists()
    assert not (tmp_path / "run0" / "published" / "exp").exists()


# -- small files that cost the reader far more than their size ---------------------------------

def _nested(depth: int) -> tuple:
    """A tuple holding one tuple twice, ``depth`` levels down: a pickle keeps each level once
    (some bytes each), its repr doubles with each level (2**depth paths)."""
    value: tuple = ()
    for _ in range(depth):
        value = (value, value)
    return value


class _BytesOf:
    """Pickles as a call of bytes() with ``arg``: what safe loading refuses, naming the argument."""

    def __init__(self, arg):
        self.arg = arg

    def __reduce__(self):
        return bytes, (self.arg,)


def _peak_while(fn) -> int:
    """The most memory Python allocated (bytes) while ``fn()`` ran."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_refused_call_whose_argument_nests_itself_is_named_in_a_few_bytes(tmp_path):
    """A 200-byte pickle whose refused bytes() argument nests a tuple in itself: building its
    repr for the message took 585 MiB at 24 levels and ran out of memory at 40."""
    path = tmp_path / "extra.pt"
    torch.save({"x": _BytesOf(_nested(22))}, path)
    assert path.stat().st_size < 2000

    def refused():
        with pytest.raises(UnsafeCheckpointError, match=r"a call of bytes\(\) with arguments \(\(\(\("):
            safeload.load(str(path))

    assert _peak_while(refused) < 20 * 2**20


def test_metadata_placing_an_item_at_a_path_that_nests_itself_is_refused_in_a_few_bytes(tmp_path):
    metadata = pickle.loads(_saved_metadata(tmp_path))
    key = next(k for k in metadata.planner_data if k.startswith("model."))
    metadata.planner_data[key] = ("model", _nested(22))

    def refused():
        with pytest.raises(ckptkit_errors.CorruptCheckpointError, match="places"):
            sharded.read_metadata(io.BytesIO(pickle.dumps(metadata)))

    assert _peak_while(refused) < 20 * 2**20


@pytest.mark.parametrize("lie", ["no chunks", "more than the files"])
def test_metadata_declaring_tensors_its_files_do_not_hold_is_refused_before_any_is_made(tmp_path, lie):
    """Export and publish make every tensor the metadata declares before reading a chunk: a 2 KB
    .metadata declaring 10**9 elements and no chunks made a 4 GB file, and verify passed it."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata

    cfg, folder, _ = _dcp_checkpoint(tmp_path, make_plugin_manager(autoload=False), seed=0)
    metadata = _metadata(folder)
    model_key = next(k for k in metadata.state_dict_metadata if k.startswith("model."))
    like = metadata.state_dict_metadata[model_key]
    size = torch.Size([10**9])
    chunks = [] if lie == "no chunks" else [ChunkStorageMetadata(offsets=torch.Size([0]), sizes=size)]
    metadata.state_dict_metadata["model.huge"] = TensorStorageMetadata(like.properties, size, chunks)
    _write_metadata(folder, metadata)
    rewrite_manifest(folder)
    ck = CheckpointManager.from_config(cfg, plugin_manager=make_plugin_manager(autoload=False))
    message = "its chunks hold 0" if lie == "no chunks" else "declares 4000.* bytes of tensors, more than"
    with pytest.raises(ckptkit_errors.CorruptCheckpointError, match=message):
        ck.verify(ck.list_checkpoints()[0])
    with pytest.warns(RuntimeWarning, match=message), \
            pytest.raises(ckptkit_errors.CorruptCheckpointError, match="no verified checkpoint"):
        ck.export(tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()
    ck.close()


def test_a_mapped_state_nesting_a_tuple_in_itself_restores_without_walking_every_path(tmp_path):
    """A state file of 1 MiB or more is mapped, and what is not the model is copied out of the
    mapping: that walk went down every path of a tuple nested in itself (2**22 at 22 levels took
    13 s; 40 would take weeks)."""
    cfg = local_config(tmp_path)
    ck = CheckpointManager.from_config(cfg)
    model = torch.nn.Linear(512, 512)  # 1 MiB of weights: the file is mapped
    ck.save(step=1, model=model, extra={"shared": {"t": 1}})
    ck.close()
    folder = tmp_path / "scratch" / "exp" / f"step-{1:010d}"
    state = torch.load(folder / "state.pt", weights_only=True)
    deep = _nested(40)
    state["nested"] = deep
    torch.save(state, folder / "state.pt")
    rewrite_manifest(folder)

    from ckptkit import reading

    calls = []
    real = reading._owned_container

    def counted(obj, memo):
        calls.append(1)
        return real(obj, memo)

    reading._owned_container = counted
    try:
        fresh = torch.nn.Linear(512, 512)
        ck = CheckpointManager.from_config(cfg)
        ck.restore(model=fresh)
        ck.close()
    finally:
        reading._owned_container = real
    assert torch.equal(fresh.weight, model.weight)
    assert len(calls) < 100  # each of the 40 levels once, not once per path


def _finishes(fn, seconds=120.0):
    """``fn()``'s result or exception, run on a thread: a hang is a failure within ``seconds``,
    not a test run that never ends. A bound on a hang, far above the time it takes, not a speed goal."""
    import threading

    out: dict = {}

    def run():
        try:
            out["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return out


def _two_steps(tmp_path, extra: bool = False):
    """A local run with steps 1 and 2 committed: its config and step 2's folder, for an attack
    on step 2 that restore must pass over for step 1."""
    cfg = local_config(tmp_path)
    ck = CheckpointManager.from_config(cfg)
    model, opt = make_model(seed=0)
    for step in (1, 2):
        ck.save(step=step, model=model, optimizer=opt, extra={"epoch": step} if extra else None)
    ck.close()
    return cfg, tmp_path / "scratch" / "exp" / f"step-{2:010d}"


def test_a_split_state_claiming_ten_billion_parts_is_refused_without_naming_them(tmp_path):
    """A manifest of 64 bytes listing ``state-00-of-9999999999.pt``: building the names of every
    part it claims took 2 GB and 17 s before a MemoryError that restore did not skip."""
    cfg, folder = _two_steps(tmp_path)
    name = "state-00-of-9999999999.pt"
    os.rename(folder / "state.pt", folder / name)
    data = json.loads((folder / "manifest.json").read_text())
    data["files"][name] = data["files"].pop("state.pt")
    rewrite_manifest(folder, files=data["files"])
    ck = CheckpointManager.from_config(cfg)
    fresh, fresh_opt = make_model(seed=1)
    with pytest.warns(RuntimeWarning, match="incomplete or mixed set of state parts"):
        out = _finishes(lambda: ck.restore(model=fresh, optimizer=fresh_opt))
    assert out["result"].step == 1
    with pytest.raises(ckptkit_errors.CorruptCheckpointError, match="incomplete or mixed set of state parts"):
        ck.verify(ck.list_checkpoints()[0])
    ck.close()


def test_a_sharded_manifest_claiming_a_huge_world_size_restores_without_counting_to_it(tmp_path):
    """rank_extra files were looked for by counting to the manifest's world_size: 10**15 hung restore."""
    cfg, folder, model = _dcp_checkpoint(tmp_path, make_plugin_manager(autoload=False), seed=0)
    rewrite_manifest(folder, world_size=10**15)
    ck = CheckpointManager.from_config(cfg, plugin_manager=make_plugin_manager(autoload=False))
    fresh, opt = make_model(seed=2)
    out = _finishes(lambda: ck.restore(model=fresh, optimizer=opt))
    ck.close()
    assert "error" not in out and out["result"].step == 1
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def _compressed_copy(path, padding: int) -> None:
    """``path`` rewritten with its pickle deflated and ``padding`` zero bytes after it, which the
    unpickler never reaches: a file of a few KiB that unpacks into ``padding`` bytes."""
    import zipfile

    plain = io.BytesIO()  # ckptkit writes no per-record crc32, which zipfile checks when reading
    torch.save(torch.load(path, weights_only=True), plain)
    with zipfile.ZipFile(plain) as src:
        records = [(info, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w") as out:
        for info, data in records:
            if info.filename.endswith("data.pkl"):
                out.writestr(info.filename, data + b"\0" * padding, compress_type=zipfile.ZIP_DEFLATED)
            else:
                out.writestr(info, data, compress_type=zipfile.ZIP_STORED)


@pytest.mark.parametrize("name", ["state.pt", "extra.pt"])
def test_a_state_file_with_a_compressed_record_is_refused_unread(tmp_path, name):
    """torch.save stores every record as it is; a deflated data.pkl padded past its end made a
    510 KB file take 520 MiB to load. It is refused as corrupt and restore goes on from the step before."""
    cfg, folder = _two_steps(tmp_path, extra=True)
    _compressed_copy(folder / name, 8 * 2**20)
    assert (folder / name).stat().st_size < 2**20
    rewrite_manifest(folder)
    with pytest.raises(ckptkit_errors.CorruptCheckpointError, match=r"compressed record \(.*data\.pkl"):
        safeload.load(folder / name)
    ck = CheckpointManager.from_config(cfg)
    fresh, fresh_opt = make_model(seed=1)
    with pytest.warns(RuntimeWarning, match="compressed record"):
        assert ck.restore(model=fresh, optimizer=fresh_opt, extra={"epoch": None}).step == 1
    ck.close()


def _central_directory(raw: bytes) -> tuple[int, int, int]:
    """The end record's position, and the central directory's offset and size it gives."""
    end = raw.rfind(b"PK\x05\x06")
    size, offset = struct.unpack("<LL", raw[end + 12:end + 20])
    return end, offset, size


def _junk_before_end(raw: bytes) -> bytes:
    end, _, _ = _central_directory(raw)
    return raw[:end] + b"\0" * 64 + raw[end:]


def _stored_copy_of_directory(raw: bytes) -> bytes:
    """A second copy of the central directory, every record marked stored, put before the end
    record, which still gives the first (deflated) one's offset: zipfile reads the copy, torch
    the original."""
    end, offset, size = _central_directory(raw)
    directory = bytearray(raw[offset:offset + size])
    at = 0
    while at < len(directory):
        struct.pack_into("<H", directory, at + 10, 0)
        struct.pack_into("<L", directory, at + 20, struct.unpack_from("<L", directory, at + 24)[0])  # sizes agree
        names, extra, comment = struct.unpack("<3H", directory[at + 28:at + 34])
        at += 46 + names + extra + comment
    return raw[:end] + bytes(directory) + raw[end:]


def _unsupported_version(raw: bytes) -> bytes:
    """The first directory record asks for zip version 13.4, which zipfile refuses with a
    NotImplementedError and torch reads anyway."""
    _, offset, _ = _central_directory(raw)
    out = bytearray(raw)
    out[offset + 6] = 134
    return bytes(out)


@pytest.mark.parametrize("craft", [_junk_before_end, _stored_copy_of_directory, _unsupported_version])
def test_a_state_file_zipfile_reads_otherwise_than_torch_is_refused(tmp_path, craft):
    """What Python's zipfile cannot read, or reads elsewhere than torch's reader does, is not
    known to hold no compressed record: refused as corrupt, and restore goes on from the step before."""
    cfg, folder = _two_steps(tmp_path)
    if craft is not _unsupported_version:
        _compressed_copy(folder / "state.pt", 8 * 2**20)
    (folder / "state.pt").write_bytes(craft((folder / "state.pt").read_bytes()))
    rewrite_manifest(folder)
    with pytest.raises(ckptkit_errors.CorruptCheckpointError, match="torch.save never writes"):
        safeload.load(folder / "state.pt")
    ck = CheckpointManager.from_config(cfg)
    fresh, fresh_opt = make_model(seed=1)
    with pytest.warns(RuntimeWarning, match="torch.save never writes"):
        assert ck.restore(model=fresh, optimizer=fresh_opt).step == 1
    ck.close()


@pytest.mark.parametrize("what", ["fifo", "link to /dev/zero"])
def test_publish_from_a_folder_reads_its_manifest_only_if_it_is_a_regular_file(tmp_path, what):
    """``ckptkit publish --from FOLDER`` read the manifest with a plain open(): a pipe in its
    place hung the command, a link to /dev/zero filled memory."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    if what == "fifo":
        os.mkfifo(folder / "manifest.json")
    else:
        os.symlink("/dev/zero", folder / "manifest.json")
    out = _finishes(lambda: source_from_folder(folder))
    assert isinstance(out.get("error"), ckptkit_errors.CheckpointError)
    assert "manifest.json" in str(out["error"])


# -- shards that DCP itself would read into harm -------------------------------------------


def _crafted_dcp(tmp_path, change, remote=False):
    """Two sharded checkpoints, the second's ``.metadata`` (and shards) edited by
    ``change(metadata, folder)`` and its manifest resealed, as an attacker who controls the store
    would. ``remote``: read through ckptkit's object-store backend (over the same folder), which
    downloads before DCP reads."""
    from trust.faults import FaultyFileBackend

    cfg, first, model = _dcp_checkpoint(tmp_path, make_plugin_manager(autoload=False), seed=0, final=True)
    newer, newer_opt = make_model(seed=4)
    train_step(newer, newer_opt)
    with CheckpointManager.from_config(cfg, plugin_manager=make_plugin_manager(autoload=False)) as ck:
        ck.save(step=2, model=newer, optimizer=newer_opt)
    folder = first.parent / "step-0000000002"
    metadata = _metadata(folder)
    change(metadata, folder)
    _write_metadata(folder, metadata)
    rewrite_manifest(folder)
    pm = make_plugin_manager(autoload=False)
    if remote:
        pm.add_backend_type("faultyfs", FaultyFileBackend)
        cfg["backends"]["scratch"]["type"] = "faultyfs"
    return CheckpointManager.from_config(cfg, plugin_manager=pm), model


def _refused_everywhere(tmp_path, crafted, message) -> None:
    """verify and publish of step 2 refuse it with ``message``; restore and export warn so and go
    on from step 1, of which they load what was saved, nothing of step 2."""
    ck, model = crafted
    with pytest.raises(ckptkit_errors.CorruptCheckpointError, match=message):
        ck.verify(ck.list_checkpoints()[0])
    fresh, opt = make_model(seed=3)
    with pytest.warns(RuntimeWarning, match=message):
        assert ck.restore(fresh, opt).step == 1
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    with pytest.warns(RuntimeWarning, match=message) as told:
        assert ck.export(tmp_path / "out.pt").step == 1
    # Named once, by its address, not the scratch copy's or its folder's as well.
    assert [str(w.message).count("step-0000000002") for w in told if re.search(message, str(w.message))] == [1]
    exported = torch.load(tmp_path / "out.pt", weights_only=True)["model"]
    assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ckptkit_errors.CorruptCheckpointError, match=message):
        publish(ck, find_source(ck, step=2))
    ck.close()


def _item(metadata, fqn):
    return next(k for k in metadata.storage_data if k.fqn == fqn)


@pytest.mark.parametrize("fqn", ["model.0.weight", "optimizer.param_groups.0.lr"], ids=["tensor", "bytes"])
@pytest.mark.parametrize("remote", [False, True], ids=["local", "object store"])
def test_a_compressed_record_in_a_shard_is_refused_before_dcp_unpacks_it(tmp_path, remote, fqn):
    """DCP loads each tensor item with torch.load, which unpacks a deflated record whole: a
    1 MB shard took 1 GB on restore and export. Here 32 MiB of zeros packed into a few KB. A
    bytes item was refused only once DCP's load had begun, as a misfit of the model."""
    bomb = deflated_torch_file(8 * 2**20)
    assert len(bomb) < 2**20

    def plant(metadata, folder):
        index = _item(metadata, fqn)
        shard = folder / metadata.storage_data[index].relative_path
        offset = shard.stat().st_size
        with open(shard, "ab") as f:
            f.write(bomb)
        metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], offset=offset,
                                                           length=len(bomb))

    _refused_everywhere(tmp_path, _crafted_dcp(tmp_path, plant, remote),
                        rf"item '{re.escape(fqn)}' in __0_0\.distcp holds a compressed record")


def test_an_item_stored_through_a_transform_is_refused_unread(tmp_path):
    """DCP unpacks an item stored through a transform (zstd) whole, before anything checks a byte
    of it: a 49 KB shard took 2 GB. ckptkit writes none."""
    def transform(metadata, folder):
        index = _item(metadata, "model.0.weight")
        metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index],
                                                           transform_descriptors=["stream.zstd/1"])

    _refused_everywhere(tmp_path, _crafted_dcp(tmp_path, transform), r"through \['stream\.zstd/1'\], which ckptkit "
                                                                     "never writes")


@pytest.mark.parametrize("lie", ["overlapping", "outside"])
def test_chunks_that_overlap_or_reach_outside_their_tensor_are_refused(tmp_path, lie):
    """Two chunks at the same offset, each half the tensor, add up to its size: verify passed,
    export wrote the half never read as whatever memory held (another tensor freed a moment
    before), and publish registered it as the final model."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    def chunks(metadata, folder):
        md = metadata.state_dict_metadata["model.0.weight"]  # 32 x 16
        second = [0, 0] if lie == "overlapping" else [16, 8]
        md.chunks = [ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([16, 16])),
                     ChunkStorageMetadata(offsets=torch.Size(second), sizes=torch.Size([16, 16]))]

    _refused_everywhere(tmp_path, _crafted_dcp(tmp_path, chunks), r"gives 'model\.0\.weight' chunks that overlap or "
                                                                  "reach outside it")


def test_an_item_placed_past_the_end_of_its_file_is_refused(tmp_path):
    def past_the_end(metadata, folder):
        index = _item(metadata, "model.2.bias")
        info = metadata.storage_data[index]
        size = (folder / info.relative_path).stat().st_size
        metadata.storage_data[index] = dataclasses.replace(info, offset=size - 10, length=info.length)

    _refused_everywhere(tmp_path, _crafted_dcp(tmp_path, past_the_end),
                        r"places 'model\.2\.bias' at bytes \d+ to \d+ of __0_0\.distcp, which has \d+")


def test_shards_that_do_not_fit_their_metadata_are_a_corrupt_checkpoint_for_export(tmp_path, capsys):
    """A tensor item pointing at another tensor's bytes (of another shape) made export raise
    DCP's own CheckpointException, and the command line print two tracebacks."""
    def swapped(metadata, folder):
        weight, bias = _item(metadata, "model.0.weight"), _item(metadata, "model.0.bias")
        metadata.storage_data[weight] = metadata.storage_data[bias]

    ck, model = _crafted_dcp(tmp_path, swapped)
    with pytest.warns(RuntimeWarning, match=r"its shards do not fit its \.metadata \(\w+Error: "):
        assert ck.export(tmp_path / "out.pt").step == 1
    ck.close()
    cfg_file = tmp_path / "ckptkit.yaml"
    cfg_file.write_text(json.dumps(local_config(tmp_path / "run0") | {"roles": {"resume": {
        "backends": ["scratch"], "every_n_steps": 1, "format": "dcp"}}}))
    capsys.readouterr()
    assert main(["export", str(cfg_file), "--out", str(tmp_path / "cli.pt"), "--step", "2"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("ckptkit: error:") and "Traceback" not in err, err
    assert "its shards do not fit its .metadata" in " ".join(err.split()), err  # however wide the terminal
    assert not (tmp_path / "cli.pt").exists()


@pytest.mark.parametrize("error", [OSError, MemoryError, KeyboardInterrupt], ids=lambda e: e.__name__)
def test_this_machine_failing_while_shards_load_is_not_taken_for_shards_that_do_not_fit(tmp_path, error):
    """DCP hands every failure inside its load back wrapped: a read error, memory running out or
    a Ctrl-C was told as shards that do not fit their metadata, and export skipped the newest
    step for the one before it."""
    from trust.faults import FaultyFS

    _, folder, _ = _dcp_checkpoint(tmp_path, make_plugin_manager(autoload=False), seed=0)
    names = json.loads((folder / "manifest.json").read_text())["files"]
    fs = FaultyFS()
    armed = fs.faults.add(op="open_read", path=".distcp", error=error.__name__, times=None)
    with pytest.raises(error):
        sharded.load_full(fs, str(folder), list(names))
    assert armed.fired >= 1
    assert sharded.load_full(fsspec.filesystem("file"), str(folder), list(names))["model"]  # the files are whole


def test_the_deep_check_from_an_object_store_reads_each_items_ends_and_refuses_a_compressed_one(tmp_path):
    """From an object store, each item's first bytes and end are fetched in one batch of ranged
    reads (a stream re-fetched its read-ahead at each seek: 5.5 GB for a 1.5 GB shard): an
    item larger than what is fetched of its end passes, a compressed one is refused. fsspec's
    in-memory filesystem stands for the store: not a local one."""
    import uuid

    _, folder, _ = _dcp_checkpoint(tmp_path, make_plugin_manager(autoload=False), seed=0)
    metadata = _metadata(folder)
    shard = folder / metadata.storage_data[_item(metadata, "model.0.weight")].relative_path

    def append(index, payload: bytes) -> None:
        offset = shard.stat().st_size
        with open(shard, "ab") as f:
            f.write(payload)
        metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], offset=offset,
                                                           length=len(payload))
        _write_metadata(folder, metadata)

    large = io.BytesIO()
    torch.save(torch.arange(2**18, dtype=torch.float32), large)  # 1 MiB: its end is fetched apart
    assert len(large.getvalue()) > 2 * sharded._ITEM_TAIL
    append(_item(metadata, "model.0.weight"), large.getvalue())
    names = list(json.loads((folder / "manifest.json").read_text())["files"])
    store = fsspec.filesystem("memory")
    root = f"/ckptkit-{uuid.uuid4().hex}"

    def upload() -> None:
        for name in os.listdir(folder):
            store.pipe_file(f"{root}/{name}", (folder / name).read_bytes())

    try:
        upload()
        sharded.check(store, root, names)  # stored records only: passes
        append(_item(metadata, "model.2.weight"), deflated_torch_file(2**20))
        upload()
        with pytest.raises(ckptkit_errors.CorruptCheckpointError,
                           match=r"item 'model\.2\.weight' in __0_0\.distcp holds a compressed record"):
            sharded.check(store, root, names)
    finally:
        store.rm(root, recursive=True)


def _grid(*cuts):
    """The chunks of a tensor split at ``cuts`` along each dimension: (offsets, sizes) each."""
    spans = [[(a, b - a) for a, b in zip(c, c[1:])] for c in cuts]
    return [(tuple(o for o, _ in cell), tuple(n for _, n in cell)) for cell in itertools.product(*spans)]


@pytest.mark.parametrize("size, chunks, tiled", [
    ((10,), _grid((0, 3, 6, 10)), True),                                 # uneven, along one dimension
    ((8, 6), _grid((0, 4, 8), (0, 1, 6)), True),                         # a 2-D mesh, unevenly
    ((8, 6), _grid((0, 1, 2, 5, 8), (0, 6)), True),                      # split twice along dimension 0
    ((8, 6), [((0, 0), (4, 6)), ((4, 0), (4, 3)), ((4, 3), (4, 3))], True),  # split further in one half only
    ((2,) * 12, _grid(*[(0, 1, 2)] * 12), True),                         # 4,096 chunks of one element
    ((), [((), ())], True),
    ((8, 6), [((0, 0), (8, 6)), ((0, 0), (0, 6))], True),               # an empty chunk covers nothing
    ((8, 6), [((0, 0), (4, 6)), ((2, 0), (4, 6))], False),               # overlapping
    ((8, 6), [((0, 0), (4, 6)), ((4, 0), (4, 3)), ((4, 2), (4, 3))], False),  # overlapping in one cell
    ((8, 6), [((0, 0), (4, 6)), ((5, 0), (4, 6))], False),               # reaching outside
    ((), [((), ()), ((), ())], False),
])
def test_chunks_tile_their_tensor_only_where_none_overlaps(size, chunks, tiled):
    assert sharded._tiles(size, [tuple(map(tuple, c)) for c in chunks]) is tiled


def test_chunks_that_would_take_more_than_a_bounded_check_are_refused_not_checked():
    """A crafted .metadata of n chunks cost n**2/4 comparisons (16,384 chunks: 103 s). Chunks laid
    out so that each covers many cells of the grid their edges make (n rows over n columns: n**2
    cells) are refused unchecked; no DCP save lays them out so."""
    n = 1100
    rows = [((r, 0), (1, n)) for r in range(n)]
    columns = [((n, c), (n, 1)) for c in range(n)]
    with pytest.raises(sharded._Irregular):
        sharded._tiles((2 * n, n), rows + columns)
    # Few chunks, each covering many cells: 32 chunks of a 17-dimensional tensor covered 2**20
    # cells (1.4 s), and a .metadata of 1.4 MB holds 430 such tensors.
    size = (16,) + (2,) * 16
    chunks = []
    for g in range(16):
        for half in (0, 1):
            offsets, sizes = [g] + [0] * 16, [1] + [2] * 16
            offsets[g + 1], sizes[g + 1] = half, 1
            chunks.append((tuple(offsets), tuple(sizes)))
    with pytest.raises(sharded._Irregular):
        sharded._tiles(size, chunks)


def test_a_chunk_that_no_shard_holds_is_refused(tmp_path):
    """A .metadata declaring a tensor whose chunks no shard holds passed verify."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorProperties, TensorStorageMetadata

    def unplaced(metadata, folder):
        metadata.state_dict_metadata["model.planted"] = TensorStorageMetadata(
            properties=TensorProperties(dtype=torch.bool), size=torch.Size([2] * 4),
            chunks=[ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size([1] * 4))
                    for o in itertools.product((0, 1), repeat=4)])

    _refused_everywhere(tmp_path, _crafted_dcp(tmp_path, unplaced),
                        r"gives 'model\.planted' a chunk at \[0, 0, 0, 0\] that no shard holds")


def test_a_split_state_whose_parts_each_pass_but_together_inflate_is_refused(tmp_path):
    """Each file of a split state (or each small item of a sharded one) was measured alone, each
    with its own 64 MiB allowance: parts of a few hundred bytes each added up without a bound,
    restored into the optimizer, exported and published."""
    from pathlib import Path

    cfg = local_config(tmp_path, final=False)
    cfg["roles"]["resume"]["write_threads"] = 2
    with CheckpointManager.from_config(cfg) as ck:
        model, opt = make_model()
        train_step(model, opt)
        folder = Path(ck.save(step=1, model=model, optimizer=opt)[0].local_dir)
    parts = sorted(p.name for p in folder.glob("state-*.pt"))
    assert len(parts) == 2, parts
    count = 4
    names = [f"state-{i:02d}-of-{count:02d}.pt" for i in range(count)]
    for old, new in zip(parts, names):
        (folder / old).rename(folder / new)
    for i in (2, 3):  # 48 MiB more each, under the allowance of one file
        torch.save({"model": {f"junk{i}": torch.zeros(1).expand(3 * 2**22)}}, folder / names[i])
    entry = {"size": 0, "digest": "xxh3_128:0"}
    rewrite_manifest(folder, files={name: dict(entry) for name in names})
    for name in names:
        safeload.load(folder / name)  # each alone loads
    with CheckpointManager.from_config(cfg) as ck:
        model, opt = make_model(1)
        with pytest.raises(UnsafeCheckpointError, match=r"step-0000000001: its tensors store .* copied densely "
                                                        r"take 96.0 MiB more"):
            ck.restore(model, opt)
        assert not opt.state and torch.equal(model[0].weight, make_model(1)[0][0].weight), "nothing was loaded"
        with pytest.raises(UnsafeCheckpointError, match="copied densely take 96.0 MiB more"):
            ck.export(tmp_path / "model.pt")


def test_a_sharded_checkpoints_small_items_each_passing_but_together_inflating_are_refused(tmp_path):
    """The same through a ``dcp`` checkpoint's ``.metadata``: bytes items of a few hundred bytes,
    each a tensor claiming 48 MiB, which export and publish load together."""
    import io
    import pickle
    from pathlib import Path

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    cfg = local_config(tmp_path, final=False)
    cfg["roles"]["resume"]["format"] = "dcp"
    with CheckpointManager.from_config(cfg) as ck:
        model, opt = make_model()
        train_step(model, opt)
        folder = Path(ck.save(step=1, model=model, optimizer=opt)[0].local_dir)
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    item = io.BytesIO()
    torch.save(torch.zeros(1).expand(3 * 2**22), item)
    blob = item.getvalue()
    with open(folder / "__junk.distcp", "wb") as f:
        for i in range(2):
            fqn = f"model.junk{i}"
            metadata.state_dict_metadata[fqn] = BytesStorageMetadata()
            metadata.storage_data[MetadataIndex(fqn)] = _StorageInfo("__junk.distcp", i * len(blob), len(blob))
            metadata.planner_data[fqn] = ("model", f"junk{i}")
            f.write(blob)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    files = json.loads((folder / "manifest.json").read_text())["files"]
    files["__junk.distcp"] = {"size": 0, "digest": "xxh3_128:0"}
    rewrite_manifest(folder, files=files)
    with CheckpointManager.from_config(cfg) as ck:
        with pytest.raises(UnsafeCheckpointError, match="copied densely take 96.0 MiB more"):
            ck.export(tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()
