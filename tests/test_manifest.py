"""A manifest holding anything ckptkit never writes is refused as such, whatever its seal says."""

from __future__ import annotations

import json
import os
import re
import time
import warnings

import pytest
from ckpt_helpers import local_config, make_model, saved_run

from ckptkit import CheckpointManager, IncompatibleCheckpointError
from ckptkit.local import LocalBackend
from ckptkit.manifest import FileEntry, Manifest, NewerManifestError, _checksum

DIGEST = "xxh3_128:" + "0" * 32


def _sealed(data: dict) -> bytes:
    data = dict(data)
    data.pop("checksum", None)
    data["checksum"] = _checksum(data)
    return json.dumps(data).encode()


def _good() -> dict:
    return Manifest(run_name="exp", step=2, epoch=0, format="torch",
                    files={"state.pt": FileEntry(size=10, digest=DIGEST)}).to_dict()


def _set(*path, value):
    def change(data):
        for key in path[:-1]:
            data = data[key]
        data[path[-1]] = value
    return change


CASES = {
    "a NUL in a file name": lambda d: d["files"].__setitem__("state\x00.pt", d["files"].pop("state.pt")),
    "a newline in a file name": lambda d: d["files"].__setitem__("a\nb", {"size": 0, "digest": DIGEST}),
    "the manifest among its files": lambda d: d["files"].__setitem__("manifest.json", {"size": 0, "digest": DIGEST}),
    "files as a list": _set("files", value=[1, 2]),
    "a file entry as a list": _set("files", "state.pt", value=[1]),
    "a size as text": _set("files", "state.pt", "size", value="10"),
    "a negative size": _set("files", "state.pt", "size", value=-5),
    "a size as a float": _set("files", "state.pt", "size", value=10.0),
    "a size as a bool": _set("files", "state.pt", "size", value=True),
    "an unknown checksum algorithm": _set("files", "state.pt", "digest", value="md5:00"),
    "a digest as a number": _set("files", "state.pt", "digest", value=5),
    "a digest that is not hex": _set("files", "state.pt", "digest", value="xxh3_128:zz"),
    "metrics as a list": _set("metrics", value=[1]),
    "a metric as text": _set("metrics", value={"loss": "abc"}),
    "a metric as a mapping": _set("metrics", value={"loss": {"a": 1}}),
    "a step as text": _set("step", value="2"),
    "a step as a float": _set("step", value=2.0),
    "a step as a bool": _set("step", value=True),
    "a negative step": _set("step", value=-1),
    "an epoch as a mapping": _set("epoch", value={"a": 1}),
    "a run name as a number": _set("run_name", value=5),
    "an unknown format": _set("format", value="pickle"),
    "an unknown role": _set("role", value="other"),
    "a world size below one": _set("world_size", value=-1),
    "an optimizer as a number": _set("optimizer", value=3),
    "no epoch": lambda d: d.pop("epoch"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_resealed_manifest_with_a_value_no_ckptkit_writes_is_refused(case):
    data = _good()
    Manifest.from_json(_sealed(data))  # the unchanged one parses
    CASES[case](data)
    with pytest.raises(ValueError):
        Manifest.from_json(_sealed(data))


def test_a_key_given_twice_is_refused_though_the_seal_covers_the_value_kept():
    text = _sealed(_good()).decode()
    doubled = text.replace('"run_name": "exp"', '"run_name": "other", "run_name": "exp"', 1)
    assert doubled != text
    with pytest.raises(ValueError, match="run_name"):
        Manifest.from_json(doubled)


def test_a_manifest_nested_too_deeply_is_refused_not_a_recursion_error():
    with pytest.raises(ValueError, match="nested"):
        Manifest.from_json('{"files": ' + "[" * 100_000 + "]" * 100_000 + "}")


@pytest.mark.parametrize("case", ["a NUL in a file name", "files as a list", "a negative size"])
def test_restore_skips_such_a_manifest_for_the_checkpoint_before(tmp_path, pm, case):
    ck, _, _ = saved_run(local_config(tmp_path, final=False), pm, (1, 2))
    path = tmp_path / "scratch/exp/step-0000000002/manifest.json"
    data = json.loads(path.read_bytes())
    CASES[case](data)
    path.write_bytes(_sealed(data))
    model2, opt2 = make_model(seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = ck.restore(model=model2, optimizer=opt2)
    assert restored.step == 1
    assert any("skipped" in str(w.message) and "step-0000000002" in str(w.message) for w in caught)


def _later_release(text: bytes) -> bytes:
    """``text`` as a later ckptkit's manifest: a later version, written by a later release."""
    text = re.sub(rb'"ckptkit_version": "[^"]*"', b'"ckptkit_version": "99.0.0"', text)
    return text.replace(b'"version": 2', b'"version": 3')


NEWER = {
    "a later version": _later_release,
    # A manifest format changed before the release was numbered: its seal tells it from damage.
    "a later version sealed intact, of this release": lambda text: _sealed({**json.loads(text), "version": 3,
                                                                            "stripes": 4}),
    "a format sealed intact": lambda text: _sealed({**json.loads(text), "format": "torch2"}),
    "a role sealed intact": lambda text: _sealed({**json.loads(text), "role": "archive"}),
}


@pytest.mark.parametrize("case", NEWER)
def test_a_checkpoint_of_a_newer_ckptkit_is_refused_by_restore_and_kept_by_prune(tmp_path, pm, case):
    """Called damaged, it was skipped for the step before, which training then saved over it;
    and a prune past the grace period deleted it as a leftover."""
    cfg = local_config(tmp_path, final=False)
    cfg["backends"]["scratch"]["leftover_grace_s"] = 60
    saved_run(cfg, pm, (1, 2))[0].close()
    folder = tmp_path / "scratch/exp/step-0000000002"
    path = folder / "manifest.json"
    changed = NEWER[case](path.read_bytes())
    assert changed != path.read_bytes()
    with pytest.raises(NewerManifestError):
        Manifest.from_json(changed)
    path.write_bytes(changed)
    for file in [folder, *folder.iterdir()]:
        os.utime(file, (time.time() - 7200, time.time() - 7200))

    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model2, opt2 = make_model(seed=1)
    with pytest.raises(IncompatibleCheckpointError, match=r"step-0000000002/manifest.json was written by a newer "
                                                          r"ckptkit: .*Upgrade ckptkit"):
        ck.restore(model=model2, optimizer=opt2)
    assert ck.restore(model=model2, optimizer=opt2, step=1).step == 1
    ck.close()
    options = {k: v for k, v in cfg["backends"]["scratch"].items() if k != "type"}
    backend = LocalBackend.from_config("scratch", options)
    backend.prune(run_name="exp", keep_last=1, protected_steps=frozenset(), dry_run=False, counted_steps=None)
    assert path.read_bytes() == changed, "neither deleted nor counted: step 1 is the one kept"
    assert (tmp_path / "scratch/exp/step-0000000001/manifest.json").exists()


def test_a_version_number_changed_by_one_bit_is_damage_not_a_newer_ckptkit(tmp_path, pm):
    """'2' and '3' differ by one bit, and the version is not under the seal a reader checks:
    taken for a newer ckptkit's, it stopped the restore, which the copy before could serve."""
    ck, model, opt = saved_run(local_config(tmp_path, final=False), pm, (1, 2))
    path = tmp_path / "scratch/exp/step-0000000002/manifest.json"
    path.write_bytes(path.read_bytes().replace(b'"version": 2', b'"version": 3'))
    with pytest.raises(ValueError, match="unknown manifest version 3") as info:
        Manifest.from_json(path.read_bytes())
    assert not isinstance(info.value, NewerManifestError)
    with pytest.warns(RuntimeWarning, match=r"skipped .*step-0000000002.*unknown manifest version 3"):
        assert ck.restore(model=model, optimizer=opt).step == 1
    ck.close()


def test_keep_best_prunes_on_beside_a_checkpoint_of_a_newer_ckptkit(tmp_path, pm):
    """keep_best reads each checkpoint's metrics: one it cannot read, a newer ckptkit's among
    them, is left out of the ranking, not a failure of every prune (the disk filled up)."""
    cfg = local_config(tmp_path, final=False, keep=2)
    cfg["roles"]["resume"]["keep_best"] = {"metric": "loss", "mode": "min"}
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    ck.save(step=1, model=model, optimizer=opt, metrics={"loss": 0.1})
    ck.close()
    path = tmp_path / "scratch/exp/step-0000000001/manifest.json"
    path.write_bytes(_later_release(path.read_bytes()))
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    for step in range(2, 8):
        ck.save(step=step, model=model, optimizer=opt, metrics={"loss": 1.0 / step}, force=True)
    ck.close()
    steps = sorted(int(n.split("-")[1]) for n in os.listdir(tmp_path / "scratch/exp") if n.startswith("step-"))
    assert steps == [1, 6, 7], "step 1 kept (a newer ckptkit's), the best and newest of the others kept"
