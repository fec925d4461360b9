"""Safe loading: everyday numpy state loads, object arrays and arbitrary types do not, and save
refuses up front what restore could not load back."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import enum
import io
import os
import pathlib
import random
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch

import ckptkit
from ckptkit import CheckpointManager, CorruptCheckpointError, UnsafeCheckpointError, UnstorableStateError
from ckptkit import safeload

from ckpt_helpers import local_config, make_model, train_step


def saved(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def round_trip(obj, **kwargs):
    return safeload.load(saved(obj), **kwargs)


def assert_same_numpy(a, b) -> None:
    assert type(a) is type(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")


NUMERIC_ARRAYS = {
    "float32 2-d": np.arange(6, dtype=np.float32).reshape(2, 3),
    "float64 fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    "int32 big-endian": np.arange(5, dtype=">i4"),
    "bool": np.array([True, False, True]),
    "complex64": np.array([1 + 2j, -3j], dtype=np.complex64),
    "0-d": np.array(3.5),
    "empty": np.zeros((0, 3), dtype=np.int16),
    "uint64 max": np.array([2**64 - 1], dtype=np.uint64),
    "float16": np.array([1.5, np.nan], dtype=np.float16),
    "longdouble": np.array([1.25], dtype=np.longdouble),
    "strided view": np.arange(10)[::3],
    "int8": np.array([-128, 127], dtype=np.int8),
}


@pytest.mark.parametrize("name", sorted(NUMERIC_ARRAYS))
def test_numeric_numpy_arrays_load(name):
    array = NUMERIC_ARRAYS[name]
    loaded = round_trip({"a": array})["a"]
    assert_same_numpy(loaded, array)
    assert loaded.flags.writeable and loaded.flags.owndata
    assert loaded.flags.f_contiguous == array.flags.f_contiguous or not array.flags.contiguous


def test_numpy_scalars_and_dtypes_load():
    values = [np.float64(1.5), np.int8(-3), np.bool_(True), np.complex128(1j), np.uint32(7),
              np.float16(2), np.longdouble(3)]
    for value, loaded in zip(values, round_trip(values)):
        assert type(loaded) is type(value) and loaded == value
    assert round_trip({"d": np.dtype(">f4")})["d"] == np.dtype(">f4")


def test_numpy_legacy_rng_state_loads_and_continues_the_stream():
    np.random.seed(7)
    np.random.random(3)
    state = np.random.get_state()
    expected = np.random.random(5)
    loaded = round_trip({"rng": state})["rng"]
    np.random.seed(0)
    np.random.set_state(loaded)
    assert np.array_equal(np.random.random(5), expected)


@pytest.mark.parametrize("bit_generator", [np.random.PCG64, np.random.MT19937, np.random.Philox, np.random.SFC64])
def test_numpy_generator_state_loads_and_continues_the_stream(bit_generator):
    rng = np.random.Generator(bit_generator(11))
    rng.random(4)
    loaded = round_trip(rng.bit_generator.state)
    other = np.random.Generator(bit_generator(0))
    other.bit_generator.state = loaded
    assert np.array_equal(other.random(6), rng.random(6))


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_numpy_state_survives_save_and_restore(tmp_path, pm, fmt):
    cfg = local_config(tmp_path, final=False)
    cfg["roles"]["resume"]["format"] = fmt
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    train_step(model, opt)
    np.random.seed(3)
    rng = np.random.default_rng(5)
    extra = {"legacy_rng": np.random.get_state(), "rng": rng.bit_generator.state,
             "ema": np.linspace(0, 1, 7, dtype=np.float32), "best": np.float64(0.25), "seen": np.int64(12)}
    ck.save(step=0, model=model, optimizer=opt, extra=extra)
    restored = ck.restore(model, opt)
    got = restored.extra
    assert got["legacy_rng"][0] == "MT19937" and np.array_equal(got["legacy_rng"][1], extra["legacy_rng"][1])
    assert got["legacy_rng"][2:] == extra["legacy_rng"][2:]
    assert got["rng"] == extra["rng"]
    assert_same_numpy(got["ema"], extra["ema"])
    assert type(got["best"]) is np.float64 and got["best"] == 0.25
    assert type(got["seen"]) is np.int64 and got["seen"] == 12
    ck.close()


# -- expanded views: a few bytes that claim any number of elements -------------------------

def test_a_file_whose_expanded_views_claim_far_more_than_they_store_is_refused(tmp_path):
    """A tensor of one stored float expanded to 2**26 elements: a file of a few KiB that a cast
    (export --dtype, a final dtype) or an optimizer's load copies into 256 MiB; more of them,
    into all the memory there is."""
    path = tmp_path / "state.pt"
    torch.save({"model": {"w": torch.zeros(3)}, "optimizer": {"state": {"0.w": {"exp_avg": torch.zeros(1).expand(2**26)}}}},
               path)
    assert path.stat().st_size < 4096
    with pytest.raises(UnsafeCheckpointError, match=r"state.pt: its tensors store 0.0 MiB and copied densely take "
                                                    r"256.0 MiB more: .* most of all \['optimizer'\]\['state'\]"
                                                    r"\['0.w'\]\['exp_avg'\]"):
        safeload.load(path)
    with pytest.raises(UnsafeCheckpointError):
        safeload.check(path)


def test_expanded_views_within_what_the_file_stores_or_64_mib_load():
    small = torch.zeros(1).expand(1000)  # 4 KB more than stored
    big = torch.arange(2**22, dtype=torch.float32)  # 16 MiB stored
    as_wide = big[:1].expand(2**22)  # as much more as the file stores
    buf = io.BytesIO()
    torch.save({"small": small, "big": big, "wide": as_wide, "mask": torch.ones(1, 1).expand(2048, 2048)}, buf)
    buf.seek(0)
    got = safeload.load(buf)
    assert got["small"].shape == (1000,) and got["wide"].stride() == (0,) and got["mask"].shape == (2048, 2048)
    assert torch.equal(got["big"], big)


def test_a_save_whose_expanded_views_restore_would_refuse_writes_nothing(tmp_path, pm):
    ck = CheckpointManager.from_config(local_config(tmp_path, final=False), plugin_manager=pm)
    model, opt = make_model()
    with pytest.raises(UnstorableStateError, match=r"extra: its tensors store .* most of all extra\['mask'\]\. "
                                                   r"Restore refuses such a file, so nothing was saved"):
        ck.save(step=1, model=model, optimizer=opt, extra={"mask": torch.zeros(1).expand(2**25)})
    assert ck.list_checkpoints() == []
    ck.save(step=1, model=model, optimizer=opt, extra={"mask": torch.zeros(1).expand(2**10)})
    assert ck.restore(model, opt).extra["mask"].shape == (2**10,)
    # The model's own state is written densely instead (as an async save's copy is), and loads.
    model.register_buffer("mask", torch.zeros(1).expand(2**25))
    ref = ck.save(step=2, model=model, optimizer=opt)[0]
    ck.verify(ref)
    mask = safeload.load(os.path.join(ref.local_dir, "state.pt"))["model"]["mask"]
    assert mask.shape == (2**25,) and mask.stride() == (1,) and not mask.any()
    ck.close()


def test_many_views_of_one_storage_claiming_far_more_than_it_holds_are_refused():
    """Each view no larger than the storage it points into, two thousand of them: 4 MiB stored,
    8 GiB once each is copied."""
    base = torch.zeros(2**20)
    buf = io.BytesIO()
    torch.save({"base": base, "views": [base[:1].expand(2**20) for _ in range(2000)]}, buf)
    buf.seek(0)
    with pytest.raises(UnsafeCheckpointError, match=r"its tensors store 4.0 MiB and copied densely take 8000.0 MiB "
                                                    r"more"):
        safeload.load(buf)
    tied = torch.randn(2**22)  # 16 MiB under two names, as tied weights are: no more than stored
    buf = io.BytesIO()
    torch.save({"embed": tied, "head": tied, "view": tied[:2**21]}, buf)
    buf.seek(0)
    assert safeload.load(buf)["head"].shape == (2**22,)


def test_a_sparse_tensor_of_expanded_indices_and_values_is_measured_by_them():
    """A sparse tensor has no plain storage of its own: its indices and values, which an
    optimizer's load copies densely, were not measured at all."""
    n = 2**25
    sparse = torch.sparse_coo_tensor(torch.zeros(1, 1, dtype=torch.long).expand(1, n),
                                     torch.zeros(1).expand(n), (4,), check_invariants=False)
    buf = io.BytesIO()
    torch.save({"optimizer": {"state": {"w": {"junk": sparse}}}}, buf)
    assert buf.tell() < 8192
    buf.seek(0)
    with pytest.raises(UnsafeCheckpointError, match=r"most of all \['optimizer'\]\['state'\]\['w'\]\['junk'\]"
                                                    r"\.(indices|values)"):
        safeload.load(buf)
    plain = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.tensor([1.0, 2.0]), (4,))
    buf = io.BytesIO()
    torch.save({"s": plain}, buf)
    buf.seek(0)
    assert torch.equal(safeload.load(buf)["s"].to_dense(), plain.to_dense())


def test_an_expanded_view_hidden_in_a_tensors_attributes_is_measured():
    carrier = torch.zeros(3)
    carrier.hidden = torch.zeros(1).expand(2**26)
    buf = io.BytesIO()
    torch.save({"w": carrier}, buf)
    buf.seek(0)
    with pytest.raises(UnsafeCheckpointError, match=r"most of all \['w'\]\.hidden"):
        safeload.load(buf)


# -- what stays refused --------------------------------------------------------------------

class _Reduces:
    """Pickles as ``func(*args)`` followed by ``__setstate__(state)``: how a crafted file looks."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def _crafted_array(dtype, values):
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy._core (2.x) or numpy.core (1.x)
    return _Reduces(reconstruct, (np.ndarray, (0,), b"b"),
                    (1, (len(values),), dtype, False, values))


REFUSED_NUMPY = {
    "object array": lambda: np.array([None, 1], dtype=object),
    "object array in a list": lambda: [np.array([{"a": 1}], dtype=object)],
    "string array": lambda: np.array(["a", "b"]),
    "structured array": lambda: np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),
    "datetime64 array": lambda: np.array(["2024-01-01"], dtype="M8[D]"),
    "object scalar dtype": lambda: np.dtype(object),
    # A float64 dtype whose flags claim it holds objects: numpy would treat the array's bytes as
    # object pointers. Allowing numpy.dtype and its DType classes as they are lets this through.
    "float64 dtype flagged as holding objects": lambda: _crafted_array(
        _Reduces(np.dtype, ("f8", False, True), (3, "<", None, None, None, -1, -1, 63)), [1e-300, 2.0]),
    "object dtype by name": lambda: _crafted_array(_Reduces(np.dtype, ("O8", False, True)), [None]),
    "structured dtype by state": lambda: _crafted_array(
        _Reduces(np.dtype, ("V8", False, True)), [b"\0" * 8]),
    "array built without numpy's format": lambda: _Reduces(np.ndarray, ((3,), "O")),
}


@pytest.mark.parametrize("name", sorted(REFUSED_NUMPY))
def test_non_numeric_numpy_state_is_refused(name):
    with pytest.raises(UnsafeCheckpointError, match="nothing in it ran"):
        round_trip({"x": REFUSED_NUMPY[name]()})


def test_a_refused_type_is_named_with_how_to_allow_it():
    started = datetime.datetime(2024, 5, 1, 12, 0)
    with pytest.raises(UnsafeCheckpointError) as info:
        round_trip({"started": started})
    message = str(info.value)
    assert "datetime.datetime" in message and "nothing in it ran" in message
    assert "safe_globals=[datetime.datetime]" in message
    assert isinstance(info.value.__cause__, Exception)
    assert round_trip({"started": started}, safe_globals=[datetime.datetime])["started"] == started


def test_the_error_names_the_file(tmp_path):
    path = tmp_path / "extra.pt"
    torch.save({"x": np.array([None], dtype=object)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"^extra\.pt: .*dtype object"):
        safeload.load(path)
    with pytest.raises(UnsafeCheckpointError, match=r"^item 'x': "):
        safeload.load(str(path), name="item 'x'")


def _good_file() -> bytes:
    return saved({"w": torch.ones(64), "a": np.ones(3)}).getvalue()


@pytest.mark.parametrize("damage", [
    lambda data: b"",
    lambda data: data[: len(data) // 2],
    lambda data: data[:-8],
    lambda data: os.urandom(256),
    lambda data: b"just some text",
], ids=["empty", "half", "tail cut", "random", "text"])
def test_damaged_files_are_corrupt_and_keep_their_cause(damage):
    with pytest.raises(CorruptCheckpointError) as info:
        safeload.load(io.BytesIO(damage(_good_file())))
    assert info.value.__cause__ is not None


def test_a_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        safeload.load(tmp_path / "nope.pt")


def test_check_reads_the_pickle_of_a_file_on_disk(tmp_path):
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.ones(1000), "a": np.arange(3)}, good)
    torch.save({"w": torch.ones(1000), "a": np.array([None], dtype=object)}, bad)
    safeload.check(good)
    with pytest.raises(UnsafeCheckpointError, match="bad.pt"):
        safeload.check(bad)


def test_without_numpy_nothing_numpy_is_allowed(tmp_path):
    path = tmp_path / "extra.pt"
    torch.save({"a": np.arange(3, dtype=np.float32)}, path)
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "from ckptkit import safeload, UnsafeCheckpointError\n"
        "try:\n"
        f"    safeload.load({str(path)!r})\n"
        "except UnsafeCheckpointError as exc:\n"
        "    print('REFUSED', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "REFUSED" in out.stdout and "numpy" in out.stdout and "not installed" in out.stdout


# -- save refuses what restore could not load -------------------------------------------------

class Color(enum.Enum):
    RED = 1


class Plain:
    def __init__(self):
        self.x = 1


Point = collections.namedtuple("Point", "x y")


def warmup_schedule(step):
    return step


class MyTensor(torch.Tensor):
    pass

STORABLE = {
    "scalars": {"a": 1, "b": 2.5, "c": "s", "d": None, "e": True, "f": b"x", "g": b"", "h": 1j, "i": 2**80},
    "containers": {"l": [1, (2, 3)], "s": {1, 2}, "o": collections.OrderedDict(a=1), "c": collections.Counter("ab")},
    "torch": {"t": torch.ones(3), "p": torch.nn.Parameter(torch.zeros(2)), "size": torch.Size([2]),
              "dtype": torch.bfloat16, "device": torch.device("cpu"), "rng": torch.get_rng_state()},
    "numpy": {"a": np.arange(4.0), "s": np.float32(1), "rng": np.random.get_state(),
              "gen": np.random.default_rng(0).bit_generator.state, "dtype": np.dtype("i8")},
    "bytearray": bytearray(b"ab"),
}

UNSTORABLE = {
    "datetime": datetime.datetime(2024, 1, 1),
    "date": datetime.date(2024, 1, 1),
    "timedelta": datetime.timedelta(seconds=3),
    "object array": np.array([None], dtype=object),
    "string array": np.array(["a"]),
    "numpy scalar type": np.float32,
    "function": warmup_schedule,
    "class instance": Plain(),
    "enum": Color.RED,
    "namedtuple": Point(1, 2),
    "path": pathlib.Path("/tmp"),
    "frozenset": frozenset({1}),
    "defaultdict": collections.defaultdict(list),
    "tensor subclass": torch.ones(1).as_subclass(MyTensor),
}


@pytest.mark.parametrize("name", sorted(STORABLE))
def test_what_save_accepts_restore_loads(name):
    value = STORABLE[name]
    safeload.check_storable({"v": value}, "extra")
    round_trip({"v": value})


@pytest.mark.parametrize("name", sorted(UNSTORABLE))
def test_what_save_refuses_restore_could_not_load(name):
    value = UNSTORABLE[name]
    with pytest.raises(UnstorableStateError, match=r"extra\['v'\]"):
        safeload.check_storable({"v": value}, "extra")
    with pytest.raises(UnsafeCheckpointError):
        round_trip({"v": value})


def test_the_error_names_the_exact_key_and_what_to_store_instead():
    state = {"clock": {"started": datetime.datetime(2024, 1, 1)}, "ok": [1, 2]}
    with pytest.raises(UnstorableStateError) as info:
        safeload.check_storable(state, "extra")
    message = str(info.value)
    assert message.startswith("extra['clock']['started'] is a datetime.datetime")
    assert "dt.timestamp()" in message and "dt.isoformat()" in message and "safe_globals" in message
    with pytest.raises(UnstorableStateError, match=r"^extra\['xs'\]\[1\] is a numpy.ndarray of dtype object"):
        safeload.check_storable({"xs": [np.zeros(2), np.array([None], dtype=object)]}, "extra")
    with pytest.raises(UnstorableStateError, match=r"^rank_extra \(the key .*Color.RED"):
        safeload.check_storable({Color.RED: 1}, "rank_extra")
    with pytest.raises(UnstorableStateError, match=r"^extra\['fn'\] is a function.*names it"):
        safeload.check_storable({"fn": lambda step: step}, "extra")


def test_allowed_types_pass_both_ways():
    value = {"when": datetime.datetime(2024, 1, 1)}
    safeload.check_storable(value, "extra", safe_globals=[datetime.datetime])
    assert round_trip(value, safe_globals=[datetime.datetime]) == value


@dataclasses.dataclass
class _RunConfig:
    lr: float
    started: Any = None


class _Built:
    """Rebuilt by a function of its own, which is not the type itself."""

    def __init__(self, n):
        self.n = n

    def __reduce__(self):
        return (_make_built, (self.n,))


def _make_built(n):
    return _Built(n)


def test_what_an_allowed_type_holds_must_load_too():
    """A trusted type is pickled with all it holds: save checks that as restore will, or it
    commits a checkpoint that restore refuses."""
    inner = {"cfg": _RunConfig(lr=0.1, started=datetime.datetime(2024, 1, 1))}
    with pytest.raises(UnstorableStateError, match=r"^extra\['cfg'\]\.started is a datetime\.datetime"):
        safeload.check_storable(inner, "extra", safe_globals=[_RunConfig])
    with pytest.raises(UnsafeCheckpointError, match="datetime"):  # what restore would have said
        round_trip(inner, safe_globals=[_RunConfig])
    # Allowed too, it passes both ways; so does a trusted type holding tensors and plain values.
    both = [_RunConfig, datetime.datetime]
    safeload.check_storable(inner, "extra", safe_globals=both)
    assert round_trip(inner, safe_globals=both)["cfg"] == inner["cfg"]
    plain = {"cfg": _RunConfig(lr=0.1, started=[torch.ones(2), "x"])}
    safeload.check_storable(plain, "extra", safe_globals=[_RunConfig])
    assert round_trip(plain, safe_globals=[_RunConfig])["cfg"].lr == 0.1
    with pytest.raises(UnstorableStateError, match=r"^extra\['b'\] is a .*_Built.*calling _make_built"):
        safeload.check_storable({"b": _Built(3)}, "extra", safe_globals=[_Built])
    with pytest.raises(UnsafeCheckpointError):
        round_trip({"b": _Built(3)}, safe_globals=[_Built])


def test_shared_and_cyclic_containers_are_walked_once():
    shared = [torch.ones(2)]
    cyclic: list = [1]
    cyclic.append(cyclic)
    safeload.check_storable({"a": shared, "b": shared, "c": cyclic}, "extra")


def test_save_refuses_a_datetime_in_extra_before_writing_anything(tmp_path, pm):
    ck = CheckpointManager.from_config(local_config(tmp_path, final=False), plugin_manager=pm)
    model, opt = make_model()
    with pytest.raises(UnstorableStateError, match=r"\['clock'\]\['started'\]"):
        ck.save(step=0, model=model, optimizer=opt, extra={"clock": {"started": datetime.datetime.now()}})
    assert ck.list_checkpoints() == []
    ck.close()


class _Trusted:
    """A type a caller allows by name."""


def test_loads_at_once_keep_what_each_allows_until_the_last_is_done():
    """torch keeps one process-wide set of allowed globals; its context manager removes on exit
    what it added, even while another thread's load still needs it."""
    assert _Trusted not in torch.serialization.get_safe_globals()
    outer = safeload._allowing([_Trusted])
    outer.__enter__()
    try:
        with safeload._allowing([_Trusted]):  # a second load at the same time, done first
            assert _Trusted in torch.serialization.get_safe_globals()
        assert _Trusted in torch.serialization.get_safe_globals()
    finally:
        outer.__exit__(None, None, None)
    assert _Trusted not in torch.serialization.get_safe_globals()


def test_a_load_leaves_what_the_trainer_allowed_itself():
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([_Trusted])
    try:
        buf = io.BytesIO()
        torch.save({"lr": np.float64(1e-3)}, buf)
        buf.seek(0)
        assert safeload.load(buf, [_Trusted]) == {"lr": np.float64(1e-3)}
        assert _Trusted in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def test_a_split_state_with_numpy_values_restores_every_time(tmp_path, pm):
    """Part 0 holds param_groups (a numpy learning rate here) and loads beside the other parts:
    a load that finished first used to take numpy's stand-ins away from it."""
    cfg = local_config(tmp_path, keep=1)
    cfg["roles"]["resume"]["write_threads"] = 2
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512, bias=False) for _ in range(8)])
    opt = torch.optim.AdamW(model.parameters(), lr=np.float64(1e-3))
    model(torch.randn(2, 512)).sum().backward()
    opt.step()
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    ck.save(step=1, model=model, optimizer=opt)
    before = set(torch.serialization.get_safe_globals())
    for _ in range(10):
        fresh = torch.optim.AdamW(model.parameters(), lr=1.0)
        assert ck.restore(model, fresh).step == 1
        assert fresh.param_groups[0]["lr"] == np.float64(1e-3)
    assert set(torch.serialization.get_safe_globals()) == before  # nothing left allowed
    ck.close()


def test_a_data_loader_is_refused_with_the_way_to_resume_its_position_not_safe_globals():
    """Trusting DataLoader would pickle its dataset and still no position: the error points to
    the recipe, not to safe_globals."""
    dataset = torch.utils.data.TensorDataset(torch.arange(8.0))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True)
    for value, name in ((loader, "DataLoader"), (loader.sampler, "RandomSampler"), (dataset, "TensorDataset")):
        with pytest.raises(UnstorableStateError) as info:
            safeload.check_storable({"data": value}, "rank_extra")
        message = str(info.value)
        assert message.startswith(f"rank_extra['data'] is a torch.utils.data.") and name in message
        assert "Resuming in the middle of an epoch" in message and "StatefulDataLoader" in message
        assert "safe_globals" not in message


class _Doubled(torch.Tensor):
    """A tensor subclass a caller allows: torch rebuilds it itself."""


def test_what_restore_loads_is_still_accepted_beside_allowed_types():
    """Values that are themselves allowed (a class held by a trusted dataclass), tensors and
    numeric arrays with their types in safe_globals, and allowed tensor subclasses all load."""
    cases = [({"cfg": _RunConfig(lr=0.1, started=torch.nn.GELU)}, [_RunConfig, torch.nn.GELU]),
             ({"w": torch.ones(2), "p": torch.nn.Parameter(torch.ones(2))}, [torch.Tensor, torch.nn.Parameter]),
             ({"t": torch.ones(3).as_subclass(_Doubled)}, [_Doubled])]
    for value, allowed in cases:
        safeload.check_storable(value, "extra", safe_globals=allowed)
        loaded = round_trip(value, safe_globals=allowed)
        assert loaded.keys() == value.keys()


class _Outer:
    class Inner(enum.Enum):
        A = 1

    @staticmethod
    def make():
        return 1


def test_a_trusted_class_defined_inside_another_is_refused_at_save():
    """pickle stores a nested class through getattr(Outer, "Inner"), which weights-only loading
    refuses whatever safe_globals allow: accepted at save, every restore of it was refused."""
    for value, allowed, what in ((_Outer.Inner.A, [_Outer.Inner], r"a .*test_safeload._Outer.Inner"),
                                 (_Outer.Inner, [_Outer.Inner], r"the class .*test_safeload._Outer.Inner"),
                                 (_Outer.make, [_Outer.make], r"the function .*test_safeload._Outer.make")):
        with pytest.raises(UnstorableStateError, match=rf"extra\['v'\] is {what}, defined inside _Outer: pickle "
                                                      r"stores it through getattr.*Define it at the top level"):
            safeload.check_storable({"v": value}, "extra", safe_globals=allowed)
        with pytest.raises(UnsafeCheckpointError, match="getattr"):  # what restore would have said
            round_trip({"v": value}, safe_globals=allowed)


_NUMPY_ALLOWED = """
import io, sys
import numpy as np, torch
from ckptkit import safeload
buf = io.BytesIO()
torch.save({"a": np.arange(6, dtype=np.float32)}, buf)
buf.seek(0)
loaded = safeload.load(buf, [np.ndarray, np.dtype, np.core.multiarray._reconstruct])
assert np.array_equal(loaded["a"], np.arange(6, dtype=np.float32))
"""


@pytest.mark.parametrize("seed", ["1", "2", "5"])
def test_numpy_names_in_safe_globals_load_in_every_process(seed):
    """torch looks allowed names up through a set: a caller's numpy.ndarray beside ckptkit's own
    stand-in for that name won or lost by the process's hash seed."""
    env = {**os.environ, "PYTHONHASHSEED": seed}
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", _NUMPY_ALLOWED], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


class _Items(list):
    """A list subclass: weights-only loading cannot fill it."""


class _KeywordsOnly:
    """Pickled through functools.partial, its __new__ taking keywords."""

    def __new__(cls, a=0, *, b=0):
        return super().__new__(cls)

    def __init__(self, a, *, b):
        self.a, self.b = a, b

    def __getnewargs_ex__(self):
        return (self.a,), {"b": self.b}


def test_allowed_types_that_restore_would_still_refuse_are_refused_at_save():
    """Each of these was saved and then refused by every restore."""
    refused = [(_Items([1, 2]), [_Items], "a subclass of list"),
               (_KeywordsOnly(1, b=2), [_KeywordsOnly], "__newobj_ex__"),
               (_RunConfig(lr=1.0), [(_RunConfig, "elsewhere._RunConfig")], "which restore could not load")]
    for value, allowed, why in refused:
        with pytest.raises(UnstorableStateError, match=why):
            safeload.check_storable({"v": value}, "extra", safe_globals=allowed)
        with pytest.raises((UnsafeCheckpointError, CorruptCheckpointError)):
            round_trip({"v": value}, safe_globals=allowed)
    # An OrderedDict allowed by name is still filled as a plain one.
    plain = {"v": collections.OrderedDict(a=torch.ones(1))}
    safeload.check_storable(plain, "extra", safe_globals=[collections.OrderedDict])
    assert round_trip(plain, safe_globals=[collections.OrderedDict])["v"].keys() == {"a"}


def test_a_file_object_not_at_its_start_loads_from_where_it_is():
    """The zip check reads the file from where the caller's position is, as torch.load does."""
    stream = io.BytesIO(b"8 bytes!" + _good_file())
    stream.seek(8)
    assert torch.equal(safeload.load(stream)["w"], torch.ones(64))


def test_a_read_that_fails_is_an_os_error_not_a_corrupt_file():
    """A store that fails mid-read says nothing about the checkpoint: restore must not pass over
    it as damaged."""
    class Failing(io.BytesIO):
        def seek(self, offset, whence=0):
            if whence == 2:
                raise OSError(5, "Input/output error")
            return super().seek(offset, whence)

    with pytest.raises(OSError, match="Input/output error"):
        safeload.load(Failing(_good_file()))


@pytest.mark.parametrize("value,hint", [
    (random.Random(1), "rng.getstate()"),
    (torch.Generator().manual_seed(1), "gen.get_state()"),
    (np.random.default_rng(1), "gen.bit_generator.state"),
    (np.random.RandomState(1), "rs.get_state(legacy=False)"),
    (np.str_("adamw"), "str(value)"),
])
def test_a_generator_or_numpy_string_is_refused_with_the_call_that_gives_its_state(value, hint):
    """A live generator in extra was told to "store a plain value"; the calls that give its
    state (which does load weights-only) are the hint."""
    try:
        safeload.check_storable({"v": value}, "extra")
    except UnstorableStateError as exc:
        assert f"Store its state, {hint}" in str(exc) or f"e.g. {hint}" in str(exc), str(exc)
    else:
        pytest.fail(f"{type(value).__name__} was not refused")


def test_every_torch_value_weights_only_loading_rebuilds_is_storable():
    """A reference-quantized module's state holds its torch.qscheme, which restore loads: save
    refused it as unloadable."""
    values = {"qscheme": torch.per_channel_affine, "dtype": torch.bfloat16, "device": torch.device("cpu"),
              "layout": torch.strided, "size": torch.Size([2, 3])}
    safeload.check_storable(values, "extra")
    assert round_trip(values) == values
