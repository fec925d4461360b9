import enum
import json
import logging
import os
import pathlib
import signal
import threading
import time
import warnings

import pytest
import torch

import ckptkit
from ckptkit import CheckpointError, CheckpointManager, IncompatibleCheckpointError, PublishError, SaveError
from ckptkit.manager import FINAL_FILE, STATE_FILE
from ckptkit.manifest import MANIFEST_NAME

from ckpt_helpers import assert_same_state, local_config, make_model, rewrite_manifest, train_step


def gather_state(model, opt):
    return ckptkit.gather.resume_state(model, opt)


def steps_on_disk(root, run="exp"):
    d = root / run
    return sorted(int(n.split("-")[1]) for n in os.listdir(d) if n.startswith("step-")) if d.exists() else []


def test_thirty_steps_keep_five_and_restore_bit_identical(tmp_path, pm):
    ck = CheckpointManager.from_config(local_config(tmp_path, keep=5), plugin_manager=pm)
    model, opt = make_model()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7)
    early = {"best": 0.25, "bad_epochs": 3}
    for step in range(30):
        loss = train_step(model, opt)
        sched.step()
        rng = torch.get_rng_state()
        ck.save(step=step, epoch=step // 10, model=model, optimizer=opt, metrics={"loss": loss},
                extra={"early_stopping": early, "sched": sched, "rng": rng})
    ck.wait()  # the prune after the last save runs on a thread of its own
    assert steps_on_disk(tmp_path / "scratch") == [25, 26, 27, 28, 29]
    assert [r.step for r in ck.list_checkpoints()] == [29, 28, 27, 26, 25]
    ck.close()
    with pytest.raises(ckptkit.CkptkitError, match="closed"):
        ck.list_checkpoints()

    model2, opt2 = make_model(seed=99)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1)
    ck2 = CheckpointManager.from_config(local_config(tmp_path, keep=5), plugin_manager=ckptkit.plugins.make_plugin_manager(autoload=False))
    restored = ck2.restore(model=model2, optimizer=opt2, extra={"sched": sched2})
    assert restored.step == 29 and restored.epoch == 2
    assert restored.metrics == {"loss": pytest.approx(loss)}
    assert restored.extra["early_stopping"] == early
    assert torch.equal(restored.extra["rng"], rng)
    assert sched2.state_dict() == sched.state_dict()
    assert_same_state(model2.state_dict(), model.state_dict())
    assert_same_state(opt2.state_dict(), opt.state_dict())
    # Training continues identically from the restored state.
    torch.manual_seed(5)
    a = train_step(model, opt)
    torch.manual_seed(5)
    b = train_step(model2, opt2)
    assert a == b
    ck2.close()


def test_save_only_when_due_and_restore_none_when_empty(tmp_path, pm):
    ck = CheckpointManager.from_config(local_config(tmp_path, every=5), plugin_manager=pm)
    model, opt = make_model()
    assert ck.restore(model, opt) is None
    saved = [s for s in range(12) if ck.save(step=s, model=model, optimizer=opt)]
    assert saved == [0, 5, 10]
    assert ck.save(step=12, model=model, optimizer=opt, force=True)
    assert steps_on_disk(tmp_path / "scratch") == [0, 5, 10, 12]


def test_two_local_roots_side_by_side_and_bytes_copied_once(tmp_path, pm):
    cfg = local_config(tmp_path, final=False)
    cfg["backends"]["nfs"] = {"type": "local", "path": f"file://{tmp_path}/nfs"}
    cfg["roles"]["resume"]["backends"] = ["scratch", "nfs"]
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    refs = ck.save(step=3, model=model, optimizer=opt, force=True)
    assert [r.backend for r in refs] == ["scratch", "nfs"]
    a = (tmp_path / "scratch/exp/step-0000000003" / STATE_FILE).read_bytes()
    b = (tmp_path / "nfs/exp/step-0000000003" / STATE_FILE).read_bytes()
    assert a == b
    ma = ck.router.call("scratch", "read_manifest", ref=refs[0])
    mb = ck.router.call("nfs", "read_manifest", ref=refs[1])
    assert ma.files == mb.files


def test_final_lands_once_in_final_backend_only(tmp_path, pm):
    ck = CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm)
    model, opt = make_model()
    ck.save(step=0, model=model, optimizer=opt)
    refs = ck.finalize(model, step=10, epoch=1, metrics={"acc": 0.9}, algorithm="mlp")
    assert [r.backend for r in refs] == ["published"]
    final_dir = tmp_path / "published/exp/final"
    assert sorted(os.listdir(final_dir)) == [FINAL_FILE, "manifest.json"]
    assert not (tmp_path / "scratch/exp/final").exists()
    assert not (tmp_path / "published/exp").joinpath("step-0000000000").exists()
    body = torch.load(final_dir / FINAL_FILE, weights_only=True)
    assert_same_state(body["model"], model.state_dict())
    assert (body["step"], body["epoch"], body["algorithm"]) == (10, 1, "mlp")


def test_final_dtype_cast(tmp_path, pm):
    cfg = local_config(tmp_path)
    cfg["roles"]["final"]["dtype"] = "bfloat16"
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, _ = make_model()
    ck.finalize(model, step=1)
    body = torch.load(tmp_path / "published/exp/final" / FINAL_FILE, weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in body["model"].values())
    assert model[0].weight.dtype == torch.float32, "the cast must not touch the live model"


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_the_final_model_carries_the_module_versions(tmp_path, pm, dtype):
    """load_state_dict converts what an older module version saved by ``_metadata``; a final
    model without it loads as if version 1 of every module had saved it."""
    cfg = local_config(tmp_path)
    if dtype:
        cfg["roles"]["final"]["dtype"] = dtype
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    ck.finalize(model, step=1)
    body = torch.load(tmp_path / "published/exp/final" / FINAL_FILE, weights_only=True)
    assert body["model"]._metadata == model.state_dict()._metadata
    assert body["model"]._metadata["1"]["version"] == 2
    ck.close()


def test_restore_falls_back_past_a_corrupt_checkpoint(tmp_path, pm):
    ck = CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm)
    model, opt = make_model()
    for step in range(3):
        train_step(model, opt)
        ck.save(step=step, model=model, optimizer=opt)
        if step == 1:
            expected = {k: v.clone() for k, v in model.state_dict().items()}
    newest = tmp_path / "scratch/exp/step-0000000002" / STATE_FILE
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the checksum can tell
    newest.write_bytes(bytes(data))
    model2, opt2 = make_model(seed=3)
    with pytest.warns(RuntimeWarning, match=r"skipped file://.*step-0000000002.*checksum"):
        restored = ck.restore(model2, opt2)
    assert restored.step == 1
    assert len(restored.skipped) == 1
    assert restored.skipped[0].count("step-0000000002") == 1  # named once, not again at the reason's start
    assert_same_state(model2.state_dict(), expected)


def test_newest_across_backends_wins(tmp_path, pm):
    cfg = local_config(tmp_path, final=False)
    cfg["backends"]["other"] = {"type": "local", "path": str(tmp_path / "other")}
    cfg["roles"]["resume"]["backends"] = ["scratch", "other"]
    model, opt = make_model()
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    ck.save(step=4, model=model, optimizer=opt, force=True)
    # Only "other" holds step 9 (scratch lost it, say a full local disk was wiped).
    train_step(model, opt)
    ck.save(step=9, model=model, optimizer=opt, force=True)
    import shutil
    shutil.rmtree(tmp_path / "scratch/exp/step-0000000009")
    m2, o2 = make_model(seed=1)
    restored = ck.restore(m2, o2)
    assert (restored.step, restored.ref.backend) == (9, "other")
    assert_same_state(m2.state_dict(), model.state_dict())


class Unsafe:
    def __init__(self, x=1):
        self.x = x


def test_unsafe_objects_are_refused_with_a_hint_and_allowed_by_name(tmp_path, pm):
    ck = CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm)
    model, opt = make_model()
    with pytest.raises(ckptkit.UnstorableStateError, match=r"extra\['thing'\] is a [\w.]*test_manager.Unsafe.*nothing was saved"):
        ck.save(step=0, model=model, optimizer=opt, extra={"thing": Unsafe(7)})
    assert ck.list_checkpoints() == []
    ck.save(step=0, model=model, optimizer=opt, extra={"thing": Unsafe(7)}, safe_globals=[Unsafe])
    with pytest.raises(ckptkit.UnsafeCheckpointError, match=r"Unsafe.*safe_globals"):
        ck.restore(model, opt)
    restored = ck.restore(model, opt, safe_globals=[Unsafe])
    assert restored.extra["thing"].x == 7


def test_restore_without_optimizer_state_is_clear(tmp_path, pm):
    ck = CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm)
    model, opt = make_model()
    ck.save(step=0, model=model)
    with pytest.raises(CheckpointError, match="holds no optimizer state .*restore it without optimizer="):
        ck.restore(model, opt)
    assert ck.restore(model).step == 0


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_the_manifest_names_the_optimizers_class_and_only_its_name_must_match(tmp_path, pm, fmt):
    """A module that torch moves an optimizer to keeps its checkpoints restorable, and so do
    manifests from before they named the class (torch's own load decides there, as it did)."""
    cfg = local_config(tmp_path)
    cfg["roles"]["resume"]["format"] = fmt
    model, opt = make_model()
    train_step(model, opt)
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        with_opt, without = ck.save(step=0, model=model, optimizer=opt)[0], ck.save(step=1, model=model)[0]

    def named(ref):
        with open(os.path.join(ref.local_dir, MANIFEST_NAME)) as f:
            return json.load(f)["optimizer"]

    assert named(with_opt) == "torch.optim.adamw:AdamW" and named(without) is None
    expected = gather_state(model, opt)
    for saved_as in ("torch.optim.moved_elsewhere:AdamW", None):
        rewrite_manifest(with_opt.local_dir, optimizer=saved_as)
        model2, opt2 = make_model(seed=5)
        with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
            assert ck.restore(model2, opt2, step=0).step == 0
        assert_same_state(gather_state(model2, opt2), expected)


def test_an_optimizer_whose_step_needs_a_closure_is_refused_where_dcp_would_make_its_state(tmp_path, pm):
    """LBFGS under format dcp: DCP makes a restoring optimizer's state by a step without a
    closure. The save is refused, with nothing written, instead of a checkpoint that no restore
    could load; and a dcp checkpoint is refused to it before anything is read."""
    cfg = local_config(tmp_path)
    cfg["roles"]["resume"]["format"] = "dcp"
    model = torch.nn.Linear(4, 2)
    lbfgs = torch.optim.LBFGS(model.parameters())
    x = torch.randn(8, 4)

    def closure():
        lbfgs.zero_grad()
        loss = model(x).pow(2).sum()
        loss.backward()
        return loss

    lbfgs.step(closure)
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        with pytest.raises(ckptkit.UnstorableStateError, match="LBFGS, whose step.. needs a closure, cannot be "
                           "restored in format dcp.*format: torch"):
            ck.save(step=1, model=model, optimizer=lbfgs)
        assert steps_on_disk(tmp_path / "scratch") == []
        other, adam = make_model()
        train_step(other, adam)
        ck.save(step=2, model=other, optimizer=adam)
        model2, _ = make_model(seed=3)
        before = gather_state(model2, None)
        with pytest.raises(ckptkit.IncompatibleCheckpointError, match="needs a closure.*without optimizer="):
            ck.restore(model2, torch.optim.LBFGS(model2.parameters()))
        assert_same_state(gather_state(model2, None), before)


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_a_model_left_on_the_meta_device_is_refused_not_restored_into_nothing(tmp_path, pm, fmt):
    cfg = local_config(tmp_path)
    cfg["roles"]["resume"]["format"] = fmt
    model, opt = make_model()
    train_step(model, opt)
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        ck.save(step=3, model=model, optimizer=opt)
    with torch.device("meta"):
        empty, _ = make_model()
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        with pytest.raises(ckptkit.IncompatibleCheckpointError, match="'0.weight' on the meta device.*to_empty"):
            ck.restore(empty)
        empty.to_empty(device="cpu")
        assert ck.restore(empty).step == 3
    assert_same_state(empty.state_dict(), model.state_dict())


def test_failing_backend_does_not_touch_the_others(tmp_path, third_party_dist):
    from ckptkit.plugins import make_plugin_manager

    cfg = local_config(tmp_path, keep=2, final=False)
    cfg["backends"]["flaky"] = {"type": "memo", "fail": True}
    cfg["roles"]["resume"]["backends"] = ["flaky", "scratch"]
    ck = CheckpointManager.from_config(cfg, plugin_manager=make_plugin_manager(autoload=True))
    model, opt = make_model()
    with pytest.raises(SaveError):
        ck.save(step=0, model=model, optimizer=opt)
    with pytest.raises(SaveError) as info:
        ck.save(step=1, model=model, optimizer=opt)
    assert "flaky" in info.value.failures and "memo store is down" in str(info.value)
    assert [r.backend for r in info.value.saved] == ["scratch"]
    assert "step-0000000001" in str(info.value)
    assert str(info.value).endswith("; it is committed on: " + info.value.saved[0].uri + ". What the failing "
                                    "backends held is as it was; the next save tries every resume backend again, and "
                                    "a restart resumes from the newest committed step"), info.value
    ck.wait()
    assert steps_on_disk(tmp_path / "scratch") == [0, 1]
    ck.on_error = "warn"
    with pytest.warns(RuntimeWarning, match="flaky") as caught:
        ck.save(step=2, model=model, optimizer=opt)
    assert caught[0].filename == __file__, "the warning points at the trainer's call, not into ckptkit"
    ck.wait()
    assert steps_on_disk(tmp_path / "scratch") == [1, 2]


def test_final_goes_to_fallback_when_no_backend_takes_it(tmp_path, third_party_dist):
    from ckptkit.plugins import make_plugin_manager

    cfg = {"backends": {"down": {"type": "memo", "fail": True}}, "roles": {"final": {"backends": ["down"]}}}
    ck = CheckpointManager.from_config(cfg, run_name="r", plugin_manager=make_plugin_manager(autoload=True),
                                       fallback_dir=tmp_path / "fb")
    model, _ = make_model()
    with pytest.raises(PublishError) as info:
        ck.finalize(model, step=3)
    fallback = tmp_path / "fb/r/final"
    assert str(fallback) in str(info.value) and "ckptkit publish" in str(info.value)
    body = torch.load(fallback / FINAL_FILE, weights_only=True)
    assert_same_state(body["model"], model.state_dict())


def test_save_does_not_hold_a_second_copy(tmp_path):
    """Peak memory of a save stays well under twice the state (it is streamed, not buffered)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import resource, torch, ckptkit
        state_mb = 256
        model = torch.nn.Linear(1024, state_mb * 256, bias=False)  # 256 MiB of float32
        ck = ckptkit.CheckpointManager.from_config({{
            "backends": {{"d": {{"type": "local", "path": {str(tmp_path)!r}}}}},
            "roles": {{"resume": {{"backends": ["d"], "every_n_steps": 1}}}}}})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ck.save(step=0, model=model)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024 / state_mb)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth = float(out.stdout.strip().splitlines()[-1])
    assert growth < 0.25, f"peak memory grew by {growth:.2f} x the state during save"


def test_manifests_with_sha256_digests_still_verify(tmp_path, pm):
    import hashlib
    import json

    ck = CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm)
    model, opt = make_model()
    ck.save(step=0, model=model, optimizer=opt)
    folder = tmp_path / "scratch/exp/step-0000000000"
    data = (folder / STATE_FILE).read_bytes()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["files"][STATE_FILE]["digest"].startswith("xxh3_128:")
    # A manifest as the first release wrote it: version 1, not sealed.
    del manifest["checksum"]
    manifest["version"] = 1
    manifest["files"][STATE_FILE] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert ck.restore(model, opt).step == 0
    manifest["files"][STATE_FILE]["sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(RuntimeWarning, match="does not match its checksum"), \
            pytest.raises(ckptkit.CorruptCheckpointError, match="none could be restored"):
        ck.restore(model, opt)


def test_save_leaves_torchs_crc32_setting_as_it_was(tmp_path, pm):
    ck = CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm)
    model, _ = make_model()
    assert torch.serialization.get_crc32_options() is True
    ck.save(step=0, model=model)
    assert torch.serialization.get_crc32_options() is True


def test_no_extra_writes_no_extra_file_and_restores_as_an_empty_extra(tmp_path, pm):
    """A checkpoint saved without extra holds no extra.pt (one file, and on an object store one
    request, fewer for each save and restore); one saved with extra holds it as given."""
    ck = CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm)
    model, opt = make_model()
    ck.save(step=0, model=model, optimizer=opt)
    ck.save(step=1, model=model, optimizer=opt, extra={})
    ck.save(step=2, model=model, optimizer=opt, extra={"epoch_seen": 7})
    ck.wait()
    extras = [tmp_path / "scratch" / "exp" / f"step-{s:010d}" / "extra.pt" for s in range(3)]
    assert [p.exists() for p in extras] == [False, False, True]
    assert torch.load(extras[2], weights_only=True) == {"epoch_seen": 7}
    assert [sorted(json.loads((p.parent / MANIFEST_NAME).read_text())["files"]) for p in extras[:2]] == [["state.pt"]] * 2
    assert ck.restore(model, opt).extra == {"epoch_seen": 7}
    restored = ck.restore(model, opt, step=1)
    assert restored.extra == {} and restored.step == 1


def test_restore_does_not_keep_the_checkpoint_file_mapped(tmp_path, pm, monkeypatch):
    """Optimizers keep loaded tensors as they are; none may point into the checkpoint file."""
    from ckptkit import reading

    monkeypatch.setattr(reading, "_MAP_MIN", 0)  # this small state through a mapping too
    ck = CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm)
    model, opt = make_model()
    train_step(model, opt)
    ck.save(step=0, model=model, optimizer=opt)
    model2, opt2 = make_model(seed=2)
    ck.restore(model2, opt2)
    with open("/proc/self/maps") as f:
        assert "step-0000000000" not in f.read()


def test_numpy_and_tensor_steps_and_epochs_are_stored_as_plain_ints(tmp_path, pm):
    np = pytest.importorskip("numpy")
    ck = CheckpointManager.from_config(local_config(tmp_path, every=2), plugin_manager=pm)
    model, opt = make_model()
    assert [r.step for r in ck.save(step=np.int64(2), epoch=np.int64(1), model=model, optimizer=opt)] == [2]
    assert [r.step for r in ck.save(step=torch.tensor(4), epoch=torch.tensor(1), model=model,
                                           optimizer=opt)] == [4]
    assert ck.save(step=np.int64(3), model=model) == []
    for bad in (-2, -3, 2.0, True):
        with pytest.raises(ValueError, match="step must be a non-negative integer"):
            ck.save(step=bad, model=model)
    restored = ck.restore(model, opt)
    assert (restored.step, restored.epoch) == (4, 1) and type(restored.epoch) is int
    ck.finalize(model=model, step=np.int64(5), epoch=np.int64(1))
    final = torch.load(tmp_path / "published" / "exp" / "final" / FINAL_FILE, weights_only=True)
    assert (final["step"], final["epoch"]) == (5, 1) and type(final["step"]) is int
    ck.close()


def test_saving_never_changes_an_unstepped_optimizer(tmp_path, pm):
    """DCP initialises an unstepped optimizer's state; a save must not leave that behind."""
    ck = CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm)
    model, opt = make_model()
    ref_model, ref_opt = make_model()
    ck.save(step=0, model=model, optimizer=opt)
    assert len(opt.state) == 0
    torch.manual_seed(3)
    a = train_step(model, opt)
    torch.manual_seed(3)
    b = train_step(ref_model, ref_opt)
    assert a == b
    assert_same_state(opt.state_dict(), ref_opt.state_dict())
    fresh_model, fresh_opt = make_model(seed=5)
    restored = ck.restore(fresh_model, fresh_opt)
    assert restored.step == 0 and len(fresh_opt.state) == 0


class _Gate:
    """A local backend whose writes wait until the test opens the gate."""

    opened = None

    @classmethod
    def make(cls):
        import threading

        from ckptkit.local import LocalBackend

        gate = threading.Event()

        class GatedLocal(LocalBackend):
            @classmethod
            def from_config(cls_, name, options):
                fail = options.pop("fail", False)
                backend = super().from_config(name, options)
                backend.fail = fail
                return backend

            def _store(self, run_name, dirname, payload):
                assert gate.wait(30), "the test never opened the gate"
                if self.fail:
                    raise OSError("disk on fire")
                return super()._store(run_name, dirname, payload)

        return GatedLocal, gate


def async_config(tmp_path, fail=False):
    return {"run_name": "exp",
            "backends": {"slow": {"type": "gated", "path": str(tmp_path / "slow"), "fail": fail}},
            "roles": {"resume": {"backends": ["slow"], "every_n_steps": 1, "keep_last": 2, "async": True}}}


def test_async_save_returns_before_writing_and_writes_what_was_staged(tmp_path, pm):
    backend_cls, gate = _Gate.make()
    pm.add_backend_type("gated", backend_cls)
    ck = CheckpointManager.from_config(async_config(tmp_path), plugin_manager=pm)
    model, opt = make_model()
    train_step(model, opt)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    assert ck.save(step=0, model=model, optimizer=opt) == []
    assert not (tmp_path / "slow/exp/step-0000000000").exists(), "save returned before the write"
    with torch.no_grad():
        for p in model.parameters():
            p.add_(100.0)  # training goes on while the write waits
    gate.set()
    refs = ck.wait()
    assert [r.step for r in refs] == [0]
    fresh, fresh_opt = make_model(seed=8)
    assert ck.restore(fresh, fresh_opt).step == 0
    assert_same_state(fresh.state_dict(), expected)
    ck.close()


def test_async_failure_is_reported_by_the_next_save_and_close_waits(tmp_path, pm):
    backend_cls, gate = _Gate.make()
    pm.add_backend_type("gated", backend_cls)
    ck = CheckpointManager.from_config(async_config(tmp_path, fail=True), plugin_manager=pm)
    model, opt = make_model()
    ck.save(step=0, model=model, optimizer=opt)
    gate.set()
    with pytest.raises(SaveError, match=r"step 0 was not saved.*slow.*disk on fire"):
        ck.save(step=1, model=model, optimizer=opt)
    with pytest.raises(SaveError, match="step 1 was not saved"):
        ck.close()

    ok = CheckpointManager.from_config(async_config(tmp_path / "ok"), plugin_manager=pm_with_gate())
    ok.save(step=5, model=model, optimizer=opt)
    ok.close()
    assert (tmp_path / "ok/slow/exp/step-0000000005/manifest.json").exists(), "close waited for the write"


def test_a_training_exception_leaving_a_with_block_is_not_replaced_by_the_failed_save(tmp_path, pm, caplog):
    """close() at the end of a with block raised the SaveError of the save in flight, and the
    training's own exception, the reason it stopped, survived only as that error's context."""
    backend_cls, gate = _Gate.make()
    pm.add_backend_type("gated", backend_cls)
    model, opt = make_model()
    with pytest.raises(ValueError, match="loss is nan") as info:
        with CheckpointManager.from_config(async_config(tmp_path, fail=True), plugin_manager=pm) as ck:
            ck.save(step=0, model=model, optimizer=opt)
            gate.set()
            raise ValueError("loss is nan")
    told = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and "while ValueError" in r.getMessage()]
    assert told and "step 0 was not saved" in told[0] and "disk on fire" in told[0]
    if hasattr(info.value, "__notes__"):
        assert "step 0 was not saved" in info.value.__notes__[0]
    # Without an exception on its way out, the failure is raised as before.
    with pytest.raises(SaveError, match="step 0 was not saved"):
        with CheckpointManager.from_config(async_config(tmp_path / "b", fail=True), plugin_manager=pm) as ck:
            ck.save(step=0, model=model, optimizer=opt)


def pm_with_gate():
    from ckptkit.plugins import make_plugin_manager

    backend_cls, gate = _Gate.make()
    gate.set()
    manager = make_plugin_manager(autoload=False)
    manager.add_backend_type("gated", backend_cls)
    return manager


def test_async_with_sharded_format_is_a_config_error(tmp_path, pm):
    cfg = local_config(tmp_path)
    cfg["roles"]["resume"].update({"async": True, "format": "dcp"})
    with pytest.raises(ckptkit.ConfigError, match="roles.resume.async: asynchronous saving works with format: torch"):
        CheckpointManager.from_config(cfg, plugin_manager=pm)


def test_non_finite_metrics_are_kept_in_strict_json(tmp_path, pm):
    import json
    import math

    ck = CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm)
    model, _ = make_model()
    ck.save(step=0, model=model, metrics={"loss": float("nan"), "grad": float("inf"), "acc": 0.5})
    text = (tmp_path / "scratch/exp/step-0000000000/manifest.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["metrics"] == {"loss": "nan", "grad": "inf", "acc": 0.5}
    restored = ck.restore(model)
    assert math.isnan(restored.metrics["loss"]) and restored.metrics["grad"] == math.inf


def test_sharded_checkpoint_without_optimizer_state_is_a_clear_error(tmp_path, pm):
    cfg = local_config(tmp_path, final=False)
    cfg["roles"]["resume"]["format"] = "dcp"
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    train_step(model, opt)
    ck.save(step=0, model=model)
    with pytest.raises(CheckpointError, match="holds no optimizer state .*restore it without optimizer="):
        ck.restore(model, opt)
    assert ck.restore(model).step == 0


def test_async_copies_extra_state_that_training_keeps_changing(tmp_path, pm):
    backend_cls, gate = _Gate.make()
    pm.add_backend_type("gated", backend_cls)
    ck = CheckpointManager.from_config(async_config(tmp_path), plugin_manager=pm)
    model, opt = make_model()
    ema = {"w": torch.zeros(4)}  # not a parameter, buffer or optimizer state, yet updated in place
    ck.save(step=0, model=model, optimizer=opt, extra={"ema": ema})
    ema["w"].add_(1.0)
    gate.set()
    ck.wait()
    restored = ck.restore(model, opt)
    assert torch.equal(restored.extra["ema"]["w"], torch.zeros(4))
    ck.close()


def test_a_failing_shard_write_is_a_save_error_and_leaves_nothing(tmp_path, pm):
    """DCP raises its own BaseException when a shard cannot be written; it must become a SaveError."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    from ckptkit.storage import FileBackend

    class FullDisk(MemoryFileSystem):
        def _open(self, path, mode="rb", **kwargs):
            if "w" in mode and path.endswith(".distcp"):
                raise OSError("no space left for shards")
            return super()._open(path, mode, **kwargs)

    fs = FullDisk(skip_instance_cache=True)

    class ShardSink(FileBackend):
        @classmethod
        def from_config(cls, name, options):
            return cls(name, fs, f"/sink-{tmp_path.name}")

    pm.add_backend_type("sink", ShardSink)
    cfg = {"run_name": "exp", "backends": {"sink": {"type": "sink"}},
           "roles": {"resume": {"backends": ["sink"], "format": "dcp", "every_n_steps": 1}}}
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    with pytest.raises(SaveError, match=r"step 0 was not saved.*sink.*no space left for shards"):
        ck.save(step=0, model=model, optimizer=opt)
    assert ck.list_checkpoints() == []
    assert not [p for p in fs.find(f"/sink-{tmp_path.name}") if "step-" in p], "the staged folder was removed"


def _background_manager(tmp_path, pm):
    cfg = local_config(tmp_path, final=False)
    cfg["roles"]["resume"].update({"async": True, "async_copy": "background"})
    return CheckpointManager.from_config(cfg, plugin_manager=pm)


def _big_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)], torch.nn.BatchNorm1d(1024))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _assert_restores(ck, expected, expected_opt):
    """``ck`` restores ``expected`` into a new model and ``expected_opt`` (by parameter) into its optimizer."""
    fresh, fresh_opt = _big_model()
    ck.restore(fresh, fresh_opt)
    assert_same_state(fresh.state_dict(), expected)
    for k, s in fresh_opt.state_dict()["state"].items():
        assert_same_state(s, expected_opt[k])


def _big_step(model, opt):
    opt.zero_grad()
    model(torch.randn(8, 1024)).pow(2).mean().backward()
    opt.step()


def test_background_copy_commits_the_state_as_save_saw_it_though_the_step_follows_at_once(tmp_path, pm):
    ck = _background_manager(tmp_path, pm)
    model, opt = _big_model()
    _big_step(model, opt)
    expected_opt = {k: {n: t.clone() for n, t in s.items()} for k, s in opt.state_dict()["state"].items()}
    opt.zero_grad()
    model(torch.randn(8, 1024)).pow(2).mean().backward()  # changes batch norm's statistics
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    assert ck.save(step=0, model=model, optimizer=opt) == []
    opt.step()  # at once: it waits for the copy, which has 48 MB to go through
    model(torch.randn(8, 1024))
    assert [r.step for r in ck.wait()] == [0]
    _assert_restores(ck, expected, expected_opt)
    ck.close()


def test_background_copy_never_commits_a_tensor_changed_in_place_outside_the_optimizer(tmp_path, pm):
    """A layer re-initialised right after save: the change races the writer's copy of it, and the
    checkpoint of that step must not be committed, whichever finished first."""
    ck = _background_manager(tmp_path, pm)
    model, opt = _big_model()
    _big_step(model, opt)
    ck.save(step=0, model=model, optimizer=opt)
    ck.wait()
    for step in (1, 2, 3):
        ck.save(step=step, model=model, optimizer=opt)
        with torch.no_grad():
            model[0].weight.normal_()
        with pytest.raises(SaveError, match=f"step {step} was not written: model.0.weight changed in place"):
            ck.wait()
        assert not (tmp_path / f"scratch/exp/step-{step:010d}").exists()
    assert [r.step for r in ck.list_checkpoints()] == [0]
    ck.close()


def test_by_default_an_async_save_defers_only_the_optimizer_state_and_copies_the_parameters_at_once(tmp_path, pm):
    """The default async_copy (optimizer_state): the parameters are copied before save returns,
    so a write that no version counter sees (an EMA helper swapping its weights in through
    ``.data`` to evaluate) cannot reach the checkpoint; the optimizer's state, which only its
    step changes, is copied while training goes on, and a change to it outside the step fails
    that save rather than committing a mix."""
    from torch.optim.optimizer import _global_optimizer_pre_hooks

    hooks = len(_global_optimizer_pre_hooks)
    cfg = local_config(tmp_path, final=False)
    cfg["roles"]["resume"].update({"async": True})
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    assert ck.resume_role.async_copy == "optimizer_state"
    model, opt = _big_model()
    _big_step(model, opt)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_opt = {k: {n: t.clone() for n, t in s.items()} for k, s in opt.state_dict()["state"].items()}
    release = threading.Event()  # the writer's copy starts only after the swap below
    ck._async._stager.copy_deferred = lambda deferred, real=ck._async._stager.copy_deferred: (
        release.wait(), real(deferred))[-1]
    ck.save(step=0, model=model, optimizer=opt)
    assert len(_global_optimizer_pre_hooks) == hooks + 1, "the next step waits for the optimizer state's copy"
    for p in model.parameters():
        p.data.copy_(torch.full_like(p, 7.0))  # an EMA swap: no version counter moves
    release.set()
    opt.step()  # waits for the copy of the moments before changing them
    assert [r.step for r in ck.wait()] == [0]
    _assert_restores(ck, expected, expected_opt)
    ck.save(step=1, model=model, optimizer=opt)
    opt.state[model[0].weight]["exp_avg"].zero_()  # a reset of the moments outside the step
    with pytest.raises(SaveError, match=r"step 1 was not written: optimizer\.state\.0\.weight\.exp_avg changed in "
                                        r"place .* async_copy: optimizer_state .* before changing optimizer state"):
        ck.wait()
    assert [r.step for r in ck.list_checkpoints()] == [0]
    ck.close()
    assert len(_global_optimizer_pre_hooks) == hooks


def test_a_save_from_inside_an_optimizer_step_copies_the_optimizer_state_at_once(tmp_path, pm):
    """A save from the closure given to step() (or a step hook): the step goes on changing the
    state once save returns, with no later step's wait before it, so the default copies all of
    it before returning instead of failing every such save."""
    cfg = local_config(tmp_path, final=False)
    cfg["roles"]["resume"].update({"async": True})
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = _big_model()
    _big_step(model, opt)
    batch = torch.randn(8, 1024)
    seen = {}

    def closure():
        opt.zero_grad()
        loss = model(batch).pow(2).mean()
        loss.backward()
        seen["opt"] = {k: {n: t.clone() for n, t in s.items()} for k, s in opt.state_dict()["state"].items()}
        ck.save(step=0, model=model, optimizer=opt)
        return loss

    opt.step(closure)
    assert [r.step for r in ck.wait()] == [0]
    fresh, fresh_opt = _big_model()
    ck.restore(fresh, fresh_opt)
    for k, s in fresh_opt.state_dict()["state"].items():
        assert_same_state(s, seen["opt"][k])
    ck.close()


def test_a_save_followed_by_evaluation_commits_without_waiting_for_the_next_step(tmp_path, pm):
    """The verdict on the deferred copy is given at the next forward pass of the thread that
    saved too, so an evaluation after save does not hold the commit until training steps again."""
    cfg = local_config(tmp_path, final=False)
    cfg["roles"]["resume"].update({"async": True})
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = _big_model()
    _big_step(model, opt)
    ck.save(step=0, model=model, optimizer=opt)
    manifest = tmp_path / "scratch" / "exp" / f"step-{0:010d}" / "manifest.json"
    model.eval()
    deadline = time.monotonic() + 60  # a bound on a hang, not a speed goal
    with torch.no_grad():
        while not manifest.exists() and time.monotonic() < deadline:
            model(torch.randn(8, 1024))  # evaluation: forward passes, no optimizer step
            time.sleep(0.01)
    assert manifest.exists(), "committed during evaluation"
    assert [r.step for r in ck.wait()] == [0]
    ck.close()


def test_a_forward_pass_gives_the_verdict_only_once_the_copy_is_done_and_only_on_the_saving_thread(tmp_path, pm):
    """A forward pass while the writer still copies, or one on another thread, cannot vouch that
    nothing changed: a reset of the moments after either still fails the save."""
    cfg = local_config(tmp_path, final=False)
    cfg["roles"]["resume"].update({"async": True})
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = _big_model()
    _big_step(model, opt)
    release = threading.Event()
    ck._async._stager.copy_deferred = lambda deferred, real=ck._async._stager.copy_deferred: (
        release.wait(), real(deferred))[-1]
    model.eval()
    with torch.no_grad():
        ck.save(step=0, model=model, optimizer=opt)
        model(torch.randn(8, 1024))  # the copy has not started
        opt.state[model[0].weight]["exp_avg"].zero_()
        release.set()
        with pytest.raises(SaveError, match="step 0 was not written: optimizer.state.0.weight.exp_avg changed"):
            ck.wait()
        ck.save(step=1, model=model, optimizer=opt)
        ck._async._copied.wait()
        other = threading.Thread(target=lambda: model(torch.randn(8, 1024)))
        other.start()
        other.join()
        opt.state[model[0].weight]["exp_avg"].zero_()
        with pytest.raises(SaveError, match="step 1 was not written"):
            ck.wait()
    assert not model._forward_pre_hooks, "the hook is there only while a verdict is pending"
    ck.save(step=2, model=model, optimizer=opt)
    assert len(model._forward_pre_hooks) == 1
    ck.close()
    assert not model._forward_pre_hooks


def test_the_verdict_hook_is_a_no_op_inside_a_graph_compiled_whole(tmp_path, pm):
    """The hook on the saved model is traced when a compiled model recompiles (an evaluation under
    no_grad): with fullgraph=True its thread calls made the compile fail."""
    cfg = local_config(tmp_path, final=False)
    cfg["roles"]["resume"].update({"async": True})
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model = torch.nn.Linear(64, 4)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    opt = torch.optim.Adam(model.parameters())
    batch = torch.randn(8, 64)
    for step in range(3):
        compiled(batch).sum().backward()
        opt.step()
        opt.zero_grad()
        ck.save(step=step, model=model, optimizer=opt)
        ck._async._copied.wait()
        with torch.no_grad():
            compiled(batch)  # a recompile, with the hook on the model
    assert [r.step for r in ck.wait()] == [2]
    ck.close()


def test_an_evaluation_through_the_module_a_saved_wrapper_wraps_commits_too(tmp_path, pm):
    """save(model=wrapper) and an evaluation through the module inside it (compiled model's
    original, DDP's .module): the verdict comes from there as well."""
    cfg = local_config(tmp_path, final=False)
    cfg["roles"]["resume"].update({"async": True})
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = _big_model()
    _big_step(model, opt)
    ck.save(step=0, model=torch.compile(model), optimizer=opt)
    manifest = tmp_path / "scratch" / "exp" / f"step-{0:010d}" / "manifest.json"
    model.eval()
    deadline = time.monotonic() + 60  # a bound on a hang, not a speed goal
    with torch.no_grad():
        while not manifest.exists() and time.monotonic() < deadline:
            model(torch.randn(8, 1024))
            time.sleep(0.01)
    assert manifest.exists(), "committed during evaluation through the inner module"
    ck.close()


DAEMON_SAVES = """
import queue, sys, threading, torch, ckptkit
from ckptkit.plugins import make_plugin_manager
ck = ckptkit.CheckpointManager.from_config(
    {"backends": {"disk": {"type": "local", "path": sys.argv[1]}},
     "roles": {"resume": {"backends": ["disk"], "every_n_steps": 1, "async": True}}},
    run_name="exp", plugin_manager=make_plugin_manager(autoload=False))
model = torch.nn.Linear(256, 256)
opt = torch.optim.Adam(model.parameters())
jobs, done = queue.Queue(), threading.Event()

def trainer():
    while True:
        jobs.get()  # waits for more work, forever at the end
        model(torch.ones(2, 256)).sum().backward()
        opt.step()
        ck.save(step=3, model=model, optimizer=opt)
        done.set()

threading.Thread(target=trainer, daemon=True).start()
jobs.put(1)
done.wait()
"""


def test_a_process_whose_daemon_thread_saved_exits_and_commits(tmp_path):
    """The thread that saved waits on a queue forever as a daemon: its verdict would never come,
    and the interpreter, joining the writer at exit, hung."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", DAEMON_SAVES, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)  # a bound on a hang, not a speed goal
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "exp" / f"step-{3:010d}" / "manifest.json").exists()


def _join_preparing():
    for thread in threading.enumerate():
        if thread.name == "ckptkit-prepare":
            thread.join()


class _TiedModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(512, 256)
        self.head = torch.nn.Linear(256, 512, bias=False)
        self.head.weight = self.emb.weight  # tied, as language models tie their embeddings


@pytest.mark.parametrize("mode", ["blocking", "optimizer_state", "background"])
def test_an_async_save_writes_a_tied_weight_once_as_a_sync_save_does(tmp_path, pm, mode):
    model = _TiedModel()
    opt = torch.optim.AdamW(model.parameters())
    model.head(model.emb(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    sizes = {}
    for kind in ("sync", mode):
        cfg = local_config(tmp_path / kind, final=False)
        if kind != "sync":
            cfg["roles"]["resume"].update({"async": True, "async_copy": mode})
        ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
        ck.save(step=0, model=model, optimizer=opt)
        ck.wait()
        ck.close()
        sizes[kind] = sum(f.stat().st_size for f in (tmp_path / kind).rglob(STATE_FILE))
    assert sizes[mode] <= sizes["sync"] + 4096, f"the tied weight is written once: {sizes}"
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    fresh = _TiedModel()
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    ck.restore(fresh, fresh_opt)
    ck.close()
    assert fresh.head.weight is fresh.emb.weight and torch.equal(fresh.head.weight, model.head.weight)
    assert torch.equal(fresh_opt.state[fresh.emb.weight]["exp_avg"], opt.state[model.emb.weight]["exp_avg"])


class _RunningCount(torch.nn.Module):
    """Keeps a count outside its parameters and buffers, as extra state, and adds to it in
    place at every forward."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.seen = torch.zeros(3)

    def forward(self, x):
        self.seen.add_(1.0)
        return self.lin(x)

    def get_extra_state(self):
        return {"seen": self.seen}

    def set_extra_state(self, state):
        self.seen.copy_(state["seen"])


@pytest.mark.parametrize("mode", ["blocking", "optimizer_state", "background"])
def test_an_async_save_holds_a_modules_extra_state_as_save_saw_it(tmp_path, pm, mode):
    """A tensor a module's get_extra_state returns is no parameter or buffer of it: it was taken
    for a private copy and written as the next forward had changed it, without a word."""
    cfg = local_config(tmp_path, final=False)
    cfg["roles"]["resume"].update({"async": True, "async_copy": mode})
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model = _RunningCount()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    at_save = model.seen.clone()
    ck.save(step=0, model=model, optimizer=opt)
    model(torch.ones(2, 3)).sum().backward()  # the next step's forward, before its optimizer step
    ck.wait()
    ck.close()
    fresh = _RunningCount()
    CheckpointManager.from_config(cfg, plugin_manager=pm).restore(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1))
    assert torch.equal(fresh.seen, at_save), (fresh.seen, at_save)


class _Stage(enum.Enum):
    WARMUP = 1


class _Curriculum(torch.nn.Module):
    """A module whose extra state is an object of its own, as a trainer's curriculum keeps it."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.stage = _Stage.WARMUP

    def get_extra_state(self):
        return {"stage": self.stage}

    def set_extra_state(self, state):
        self.stage = state["stage"]


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_a_modules_extra_state_that_restore_could_not_load_is_refused_at_save(tmp_path, pm, fmt):
    """extra= was checked before anything was written; what a module's get_extra_state returns
    was not: every step was committed, and every restore of them refused. A refused save leaves
    no step behind it either, so a save of a lower step is not refused for it."""
    cfg = local_config(tmp_path, final=False)
    cfg["roles"]["resume"]["format"] = fmt
    model = _Curriculum()
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        with pytest.raises(ckptkit.UnstorableStateError,
                           match=r"the model's state_dict\(\)\['_extra_state'\]\['stage'\] is a .*_Stage, "
                                 r"which restore could not load back safely .*nothing was saved.*safe_globals="):
            ck.save(step=5, model=model)
        assert steps_on_disk(tmp_path / "scratch") == []
        ck.save(step=4, model=model, safe_globals=[_Stage])
    fresh = _Curriculum()
    fresh.stage = None
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        assert ck.restore(fresh, safe_globals=[_Stage]).step == 4
    assert fresh.stage is _Stage.WARMUP


def test_an_optimizers_own_setting_that_restore_could_not_load_is_refused_at_save(tmp_path, pm):
    """A custom optimizer's param group setting is saved with its state, and loaded weights-only."""
    cfg = local_config(tmp_path, final=False)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.param_groups[0]["schedule"] = pathlib.PurePosixPath("cosine")
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        with pytest.raises(ckptkit.UnstorableStateError,
                           match=r"the optimizer's param_groups\[0\]\['schedule'\] is a pathlib.PurePosixPath"):
            ck.save(step=1, model=model, optimizer=opt)
    assert steps_on_disk(tmp_path / "scratch") == []


@pytest.mark.parametrize("mode", ["sync", "blocking", "background"])
def test_sparse_tensors_and_views_of_one_storage_come_back_as_saved(tmp_path, pm, mode):
    """An async save raised torch's bare "Cannot access data pointer" for a sparse buffer, and
    gave views of one storage in extra (a flat-buffer EMA) a copy each: an object that adopts what
    restore gives it then stopped updating its views with the buffer."""
    class FlatEma:
        def __init__(self):
            self.flat = torch.zeros(6)
            self.views = [self.flat[:4], self.flat[4:]]

        def state_dict(self):
            return {"flat": self.flat, "views": self.views}

        def load_state_dict(self, state):
            self.flat, self.views = state["flat"], state["views"]

    cfg = local_config(tmp_path, final=False)
    if mode != "sync":
        cfg["roles"]["resume"].update({"async": True, "async_copy": mode})
    model = torch.nn.Linear(3, 3)
    adjacency = torch.sparse_coo_tensor([[0, 1], [1, 2]], [1.0, 2.0], (3, 3))
    model.register_buffer("adjacency", adjacency)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = FlatEma()
    ema.flat.add_(1.0)
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        ck.save(step=1, model=model, optimizer=opt, extra={"ema": ema})
        ema.flat.add_(5.0)  # after save returned: not in the checkpoint
    fresh, back = torch.nn.Linear(3, 3), FlatEma()
    fresh.register_buffer("adjacency", torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long), [], (3, 3)))
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        ck.restore(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), extra={"ema": back})
    assert torch.equal(fresh.adjacency.to_dense(), adjacency.to_dense())
    back.flat.add_(1.0)
    assert [v.tolist() for v in back.views] == [[2.0] * 4, [2.0] * 2]


@pytest.mark.parametrize("mode", ["blocking", "background"])
def test_views_of_a_parameter_in_extra_are_saved_async(tmp_path, pm, mode):
    """Rows of a weight kept in extra are views that record how they were made: the copy that
    keeps views sharing their storage refused them ("Only Tensors created explicitly by the user
    support the deepcopy protocol")."""
    cfg = local_config(tmp_path, final=False)
    cfg["roles"]["resume"].update({"async": True, "async_copy": mode})
    model = torch.nn.Linear(3, 2)
    rows = {"first": model.weight[0], "second": model.weight[1]}
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        ck.save(step=1, model=model, extra={"rows": rows})
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        restored = ck.restore(torch.nn.Linear(3, 2))
    assert torch.equal(restored.extra["rows"]["second"], model.weight[1].detach())


@pytest.mark.parametrize("mode", ["sync", "blocking", "optimizer_state", "background"])
def test_the_first_async_save_copies_into_buffers_paged_in_after_the_first_step(tmp_path, pm, mode):
    """The buffers of the first async save are made while training runs, from the first step of
    the optimizer given to restore on; a sync manager, which stages nothing, makes none."""
    from torch.optim.optimizer import _global_optimizer_post_hooks

    hooks = len(_global_optimizer_post_hooks)
    cfg = local_config(tmp_path, final=False)
    if mode != "sync":
        cfg["roles"]["resume"].update({"async": True, "async_copy": mode})
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = _big_model()
    assert ck.restore(model, opt) is None  # a new training
    _join_preparing()
    if mode != "sync":
        assert sum(len(bs) for bs in ck._async._stager._spares.values()) == 10 + 10 * 2, \
            "before the first step: the parameters, and the two moments AdamW's first step will make"
    _big_step(model, opt)
    _join_preparing()
    spares = {b.data_ptr() for bs in ck._async._stager._spares.values() for b in bs}
    assert len(_global_optimizer_post_hooks) == hooks + (mode != "sync")
    if mode == "sync":
        assert spares == set()
        ck.close()
        return
    assert len(spares) == 10 + 10 * 3, "4 linear layers and batch norm's affine: 10 parameters, each with 3 state tensors"
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    ck.save(step=0, model=model, optimizer=opt)
    _big_step(model, opt)
    assert [r.step for r in ck.wait()] == [0]
    taken = {b.data_ptr() for path, b in ck._async._stager._buffers.items() if path[0] in ("model", "optimizer")}
    assert spares <= taken, "every parameter and its state were copied into the buffers made ahead"
    fresh, fresh_opt = _big_model()
    ck.restore(fresh, fresh_opt)
    assert_same_state(fresh.state_dict(), expected)
    ck.close()
    assert len(_global_optimizer_post_hooks) == hooks


def test_a_resumed_async_manager_makes_the_first_save_buffers_at_restore_and_only_then(tmp_path, pm):
    """A manager that is never given the optimizer through restore makes nothing ahead (that
    memory would be held for a save it may never make); one that restores state into it starts
    at once, before any step."""
    cfg = local_config(tmp_path, final=False)
    cfg["roles"]["resume"].update({"async": True})
    model, opt = _big_model()
    _big_step(model, opt)
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    _big_step(model, opt)
    _join_preparing()
    assert ck._async._stager._spares == {}
    ck.save(step=0, model=model, optimizer=opt)
    ck.close()
    resumed = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model2, opt2 = _big_model()
    assert resumed.restore(model2, opt2).step == 0
    _join_preparing()
    assert sum(len(bs) for bs in resumed._async._stager._spares.values()) == 10 + 10 * 3
    resumed.close()
    assert resumed._async._stager._spares == {}


CRASH_AFTER_SAVE = """
import sys, torch, ckptkit
from ckptkit.plugins import make_plugin_manager
folder, copy = sys.argv[1], sys.argv[2]
ck = ckptkit.CheckpointManager.from_config(
    {"backends": {"disk": {"type": "local", "path": folder}},
     "roles": {"resume": {"backends": ["disk"], "every_n_steps": 1, "async": True, "async_copy": copy}}},
    run_name="exp", plugin_manager=make_plugin_manager(autoload=False))
model = torch.nn.Linear(1024, 1024)
opt = torch.optim.AdamW(model.parameters())
model(torch.ones(2, 1024)).sum().backward()
opt.step()
ck.save(step=7, model=model, optimizer=opt)
torch.save(model.state_dict(), folder + "/expected.pt")
raise RuntimeError("training crashed right after save")
"""


@pytest.mark.parametrize("copy", ["blocking", "optimizer_state", "background"])
def test_an_async_save_in_flight_when_training_crashes_is_still_committed(tmp_path, pm, copy):
    """save() returned, so the step is staged; the interpreter's exit must neither lose it (the
    write used to fail half written) nor hang (the background copy's verdict comes from the
    thread that trains, which at exit will not step again)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", CRASH_AFTER_SAVE, str(tmp_path), copy],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "training crashed right after save" in proc.stderr
    assert "failed" not in proc.stderr, proc.stderr[-2000:]
    _assert_step_7_as_saved(tmp_path, pm, torch.nn.Linear(1024, 1024))


def _assert_step_7_as_saved(tmp_path, pm, model) -> None:
    """A child process's step 7 is committed and holds what it wrote to expected.pt."""
    ck = CheckpointManager.from_config(
        {"backends": {"disk": {"type": "local", "path": str(tmp_path)}},
         "roles": {"resume": {"backends": ["disk"]}}}, run_name="exp", plugin_manager=pm)
    assert ck.restore(model).step == 7
    assert_same_state(model.state_dict(), torch.load(tmp_path / "expected.pt", weights_only=True))
    ck.close()


SIGTERM_AFTER_SAVE = """
import logging, os, signal, sys, threading, time, torch, ckptkit
from ckptkit.local import LocalBackend
from ckptkit.plugins import make_plugin_manager

# Set once ckptkit's SIGTERM handler has found the save in flight (it says so before it waits):
# the write below goes on only then, so the save is in flight when SIGTERM comes however slowly
# this process runs. A filter, not a handler: ckptkit's warnings still reach stderr.
sigterm_seen = threading.Event()


class _Seen(logging.Filter):
    def filter(self, record):
        if record.getMessage().startswith("SIGTERM:"):
            sigterm_seen.set()
        return True


logging.getLogger("ckptkit.asyncsave").addFilter(_Seen())


class SlowDisk(LocalBackend):
    def _write(self, pf, path, stop):
        sigterm_seen.wait(60)  # a write still going when SIGTERM comes
        return super()._write(pf, path, stop)


pm = make_plugin_manager(autoload=False)
pm.add_backend_type("slowdisk", SlowDisk)
folder = sys.argv[1]
ck = ckptkit.CheckpointManager.from_config(
    {"backends": {"disk": {"type": "slowdisk", "path": folder}},
     "roles": {"resume": {"backends": ["disk"], "every_n_steps": 1, "async": True}}},
    run_name="exp", plugin_manager=pm)
model = torch.nn.Linear(64, 64)
opt = torch.optim.AdamW(model.parameters())
saved = threading.Event()


def train():  # saves step 7, then steps on, as a trainer does while the save writes
    model(torch.randn(2, 64)).sum().backward()
    opt.step()  # state for the save to defer (async_copy: optimizer_state)
    ck.save(step=7, model=model, optimizer=opt)
    torch.save(model.state_dict(), folder + "/expected.pt")
    saved.set()
    if sys.argv[2] == "stuck-thread":
        threading.Event().wait()  # in a collective whose peer died: no next step, no verdict
    while True:
        model(torch.randn(2, 64)).sum().backward()
        opt.step()  # the first one after the save gives the verdict the writer waits for
        time.sleep(0.05)


if sys.argv[2] == "chained":
    # A trainer's own handler, set after the manager was built, that tells and calls the one before
    # it, which ends the process as SIGTERM does: it still does.
    before = signal.getsignal(signal.SIGTERM)

    def telling(signum, frame):
        print("the trainer's handler ran", flush=True)
        before(signum, frame)

    signal.signal(signal.SIGTERM, telling)
if sys.argv[2].endswith("thread"):  # as a trainer that trains on a thread of its own (Ray Train's, a GUI's)
    ckptkit.asyncsave._VERDICT_WAIT_S = 1.0
    threading.Thread(target=train, daemon=True).start()
    saved.wait(60)
else:
    model(torch.randn(2, 64)).sum().backward()
    ck.save(step=7, model=model)
    torch.save(model.state_dict(), folder + "/expected.pt")
os.kill(os.getpid(), signal.SIGTERM)  # torchrun's, once another rank failed; a preemption's
time.sleep(60)
print("SIGTERM did not end the process")
"""


@pytest.mark.parametrize("training", ["main", "thread", "stuck-thread", "chained"])
def test_an_async_save_in_flight_at_sigterm_is_committed_before_the_process_ends(tmp_path, pm, training):
    """torchrun sends SIGTERM to every rank once one fails, as Slurm and Kubernetes do to preempt:
    the save that returned is committed, then the process ends as SIGTERM ends it. Also where
    training runs on a thread other than the main one, which alone can set a signal handler:
    the manager built on the main thread sets it (it was set at the first save only, and not at
    all from another thread, so SIGTERM ended the process with the save lost); where that thread
    is stuck and never reaches its next step, SIGTERM still ends the process, soon; and where a
    trainer's own handler calls ckptkit's."""
    import signal
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", SIGTERM_AFTER_SAVE, str(tmp_path), training],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM, proc.stdout + proc.stderr[-2000:]
    assert ("the trainer's handler ran" in proc.stdout) == (training == "chained")
    assert "in flight at SIGTERM, is committed" in proc.stderr
    assert ("is checked from here" in proc.stderr) == (training == "stuck-thread")
    _assert_step_7_as_saved(tmp_path, pm, torch.nn.Linear(64, 64))


def test_an_async_save_where_no_sigterm_handler_can_be_set_says_so(tmp_path, pm, caplog):
    """A manager built and saving on a thread other than the main one cannot set its SIGTERM
    handler: a SIGTERM would end the process before a save in flight commits, which is told once."""
    import signal

    cfg = local_config(tmp_path, final=False)
    cfg["roles"]["resume"]["async"] = True
    before = signal.getsignal(signal.SIGTERM)
    ran = []

    def train():
        with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
            model, opt = make_model()
            for step in range(2):
                train_step(model, opt)
                ck.save(step=step, model=model, optimizer=opt)
        ran.append(True)

    with caplog.at_level("WARNING", logger="ckptkit.asyncsave"):
        worker = threading.Thread(target=train, name="trainer")
        worker.start()
        worker.join(60)
    told = [r.getMessage() for r in caplog.records if "cannot set its SIGTERM handler" in r.getMessage()]
    assert ran and len(told) == 1 and "'trainer'" in told[0] and "ck.wait()" in told[0], told
    assert signal.getsignal(signal.SIGTERM) is before


class _SignalledMidStep(torch.optim.SGD):
    """SGD whose step is interrupted by SIGUSR1 halfway, while ``midway``: the first parameter
    stepped, the rest not. A closure given to it runs first, as SGD's own does."""

    midway = True

    def step(self, closure=None):
        if closure is not None:
            closure()
        params = [p for group in self.param_groups for p in group["params"]]
        with torch.no_grad():
            params[0].add_(1.0)
            if self.midway:
                signal.raise_signal(signal.SIGUSR1)  # its Python handler runs before the next line
            for p in params[1:]:
                p.add_(1.0)


@pytest.mark.parametrize("is_async", [False, True])
def test_a_save_from_a_signal_handler_that_interrupted_the_optimizer_step_is_refused(tmp_path, pm, is_async):
    """A preemption handler that saves (SIGTERM: save, close, exit) can fire inside
    optimizer.step(): the checkpoint then held some parameters stepped and others not, and
    restore took it as any other. Also a handler that first set the default back (a second
    signal then ends the process). A save in the step's hooks, in the closure given to it (before
    the step changes anything: Lightning's training step runs there), or between steps is saved."""
    cfg = local_config(tmp_path)
    cfg["roles"]["resume"]["async"] = is_async
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, _ = make_model()
    opt = _SignalledMidStep(model.parameters(), lr=0.1)
    handled = []
    publishing = [True]

    def handler(signum, frame):
        if publishing[0]:
            ck.finalize(model=model, step=1)
        handled.append(ck.save(step=len(handled) + 1, model=model, optimizer=opt, force=True))

    def once(*args):  # sets the default back first, so that a second signal ends the process
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        handler(*args)

    previous = signal.signal(signal.SIGUSR1, handler)
    steps = tmp_path / "scratch" / "exp"
    try:
        with pytest.raises(ckptkit.CkptkitError, match=r"finalize was called from a SIGUSR1 handler"):
            opt.step()
        publishing[0] = False
        with pytest.raises(ckptkit.CkptkitError, match=r"save step 1 was called from a SIGUSR1 handler that "
                                                       r"interrupted optimizer.step\(\): .* nothing was saved"):
            opt.step()
        signal.signal(signal.SIGUSR1, once)
        with pytest.raises(ckptkit.CkptkitError, match=r"save step 1 was called from a SIGUSR1 handler"):
            opt.step()
        signal.signal(signal.SIGUSR1, handler)
        assert not (tmp_path / "published").exists() or not list((tmp_path / "published").rglob("*.pt"))
        assert not handled and ck.wait() == [] and not list(steps.glob("step-*"))
        opt.midway = False
        hook = opt.register_step_post_hook(lambda *args: signal.raise_signal(signal.SIGUSR1))
        opt.step()  # a whole step, then the hook's signal
        hook.remove()
        signal.raise_signal(signal.SIGUSR1)  # between steps
        # In the closure given to one of torch's own optimizers, which runs it before any update.
        torch.optim.SGD(model.parameters(), lr=0.1).step(closure=lambda: signal.raise_signal(signal.SIGUSR1))
        ck.wait()
        assert len(handled) == 3 and sorted(p.name for p in steps.glob("step-*")) == [
            "step-0000000001", "step-0000000002", "step-0000000003"]
        # But not LBFGS's, run between its updates too, nor another optimizer's (SAM's perturbs first).
        for stepped in (torch.optim.LBFGS(model.parameters(), max_iter=2), opt):
            with pytest.raises(ckptkit.CkptkitError, match=r"save step 4 was called from a SIGUSR1 handler"):
                stepped.step(closure=lambda: (signal.raise_signal(signal.SIGUSR1), model(torch.randn(2, 16)).sum())[1])
    finally:
        signal.signal(signal.SIGUSR1, previous)
        ck.close()


def _child_exits() -> None:
    pass


def test_a_forked_worker_exits_while_an_async_save_is_in_flight(tmp_path, pm):
    """A data loader forks its workers while training goes on, an async save in flight: they
    inherit ckptkit's exit hook, but not the writer thread, and must not wait for it."""
    import multiprocessing

    ck = _background_manager(tmp_path, pm)
    model, opt = make_model()
    train_step(model, opt)
    ck.save(step=0, model=model, optimizer=opt)  # in flight until the next step or wait()
    child = multiprocessing.get_context("fork").Process(target=_child_exits)
    child.start()
    child.join(30)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0
    assert [r.step for r in ck.wait()] == [0]
    ck.close()


@pytest.mark.parametrize("where", ["extra", "rank_extra"])
def test_an_object_whose_state_dict_raises_is_refused_naming_its_key(tmp_path, pm, where):
    """accelerate's prepared DataLoader has a state_dict that raises AttributeError unless it
    was built stateful: the trainer is told which key, and nothing is written."""

    class NotStateful:
        def state_dict(self):
            return self.dl_state_dict  # as accelerate's DataLoaderShard does

    ck = CheckpointManager.from_config(local_config(tmp_path, final=False), plugin_manager=pm)
    model, opt = make_model()
    with pytest.raises(ckptkit.UnstorableStateError, match=rf"{where}\['loader'\].*AttributeError"):
        ck.save(step=1, model=model, optimizer=opt, **{where: {"loader": NotStateful()}})
    assert not os.path.exists(tmp_path / "scratch" / "exp" / "step-0000000001")


def test_save_files_refuses_a_name_that_restore_would_not_read_back(tmp_path, pm):
    """A manifest naming a file with a control character is refused on reading: committed,
    it could never be restored, and a prune would take it for a leftover."""
    folder = tmp_path / "trainer_ckpt"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"w")
    (folder / "tab\tname").write_bytes(b"x")
    ck = CheckpointManager.from_config(local_config(tmp_path, final=False), plugin_manager=pm)
    with pytest.raises(ValueError, match="cannot hold"):
        ck.save_files(step=1, files=folder)
    assert not (tmp_path / "scratch" / "exp" / "step-0000000001").exists()


def test_an_extra_object_the_checkpoint_holds_no_state_for_is_named_not_left_silently(tmp_path, pm):
    """A scheduler passed to restore under a key the save did not use kept its fresh state, with
    no word: the training then went on with step 0's learning rate."""
    ck = CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm)
    model, opt = make_model()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train_step(model, opt)
    sched.step()
    ck.save(step=1, model=model, optimizer=opt, extra={"sched": sched})
    ck.close()

    again = CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm)
    model2, opt2 = make_model(seed=2)
    other = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    with pytest.warns(RuntimeWarning, match=r"extra: 'lr_scheduler' not in .*step-0000000001 \(it holds 'sched'\); "
                                            r"that object keeps the state it has now"):
        again.restore(model2, opt2, extra={"lr_scheduler": other, "note": "not stateful"})
    assert other.last_epoch == 0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the key it holds: restored without a word
        again.restore(model2, opt2, extra={"sched": other})
    assert other.last_epoch == 1
    again.close()


def test_an_object_restore_cannot_set_in_place_is_named_not_left_silently(tmp_path, pm):
    """A sampler's generator trusted through safe_globals saved and restored without a word, but
    restore gave its state only in the result: the generator passed kept its fresh seed, and the
    data order after the resume was another than the uninterrupted run's."""
    ck = CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm)
    model, opt = make_model()
    gen = torch.Generator().manual_seed(1)
    torch.rand(5, generator=gen)
    values = {"lr": 0.5, "steps": 3, "ok": True, "name": "x", "shape": (2, 3)}
    ck.save(step=1, model=model, optimizer=opt, extra={"gen": gen, "seen": [1, 2], **values},
            rank_extra={"gen": gen}, safe_globals=[torch.Generator])
    expected = torch.rand(2, generator=gen)
    ck.close()

    again = CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm)
    fresh = torch.Generator().manual_seed(1)
    with pytest.warns(RuntimeWarning) as caught:
        # Values passed as they were saved, as numpy gives them, or of other kinds: no word of them.
        import numpy as np

        given = {"gen": fresh, "seen": [], "lr": np.float32(0.1), "steps": np.int64(1), "ok": np.bool_(False),
                 "name": pathlib.Path("y"), "shape": (1,)}
        restored = again.restore(model, opt, extra=given, rank_extra={"gen": fresh}, safe_globals=[torch.Generator])
    told = [str(w.message) for w in caught if "restore left" in str(w.message)]
    assert len(told) == 2 and all("no load_state_dict" in t for t in told), told
    assert "extra: restore left 'gen' (Generator), 'seen' (list) as they were" in told[0]
    assert "restored.extra[key]" in told[0] and not any(f"'{k}'" in told[0] for k in values), told[0]
    assert told[1].startswith("rank_extra on rank 0: restore left 'gen' (Generator) as it was")
    assert torch.equal(torch.rand(2, generator=restored.extra["gen"]), expected)
    again.close()


def test_an_extra_object_that_refuses_its_state_is_named_and_a_bare_one_is_refused_first(tmp_path, pm):
    """An EMA built around a compiled model, restored without compiling, raised torch's bare
    "Error(s) in loading state_dict for AveragedModel" once the model and optimizer were loaded;
    a scheduler passed as extra= itself failed there with "'StepLR' object has no attribute 'items'"."""
    ck = CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm)
    model, opt = make_model()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with pytest.raises(TypeError, match=r"extra must map names to objects or values .* not a StepLR"):
        ck.save(step=1, model=model, optimizer=opt, extra=sched)
    ck.save(step=1, model=model, optimizer=opt, extra={"sched": sched, "ema": torch.nn.Linear(2, 2)})
    model2, opt2 = make_model(seed=2)
    before = [p.clone() for p in model2.parameters()]
    with pytest.raises(TypeError, match=r"rank_extra must map names .* not a StepLR"):
        ck.restore(model2, opt2, rank_extra=sched)
    assert all(torch.equal(a, b) for a, b in zip(before, model2.parameters())), "refused before loading"
    with pytest.raises(IncompatibleCheckpointError, match=r"extra\['ema'\] \(a Linear\) refused the state saved in "
                                                          r".*step-0000000001: RuntimeError: Error\(s\) in loading "
                                                          r"state_dict for Linear: size mismatch for weight: copying a "
                                                          r"param with shape torch.Size\(\[2, 2\]\) from checkpoint.*"
                                                          r"restore again once it fits"):
        ck.restore(model2, opt2, extra={"sched": sched, "ema": torch.nn.Linear(3, 3)})
    # Saved from a compiled module's wrapper, restored into a plain one: the keys torch names, and why.
    compiled = torch.nn.Module()
    compiled._orig_mod = torch.nn.Linear(2, 2)
    ck.save(step=2, model=model, optimizer=opt, extra={"sched": sched, "ema": compiled})
    with pytest.raises(IncompatibleCheckpointError, match=r"Missing key\(s\) in state_dict: \"weight\", \"bias\"\. "
                                                          r"Unexpected key\(s\) in state_dict: \"_orig_mod.weight\".*"
                                                          r"torch.compile's '_orig_mod.' prefix is on the keys of one side only"):
        ck.restore(model2, opt2, extra={"sched": sched, "ema": torch.nn.Linear(2, 2)})
    ck.close()


def test_restore_files_refuses_a_folder_holding_other_files(tmp_path, pm):
    """restore_files(args.output_dir) replaced the whole folder: the trainer's logs in it went."""
    ck = CheckpointManager.from_config(local_config(tmp_path, final=False), plugin_manager=pm)
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(b"w" * 100)
    ck.save_files(step=1, files=src)
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "train.log").write_text("epoch 1")
    with pytest.raises(ckptkit.CkptkitError, match=r"holds what is not this checkpoint's \(runs, train.log\)"):
        ck.restore_files(out)
    assert (out / "train.log").read_text() == "epoch 1" and (out / "runs").is_dir()
    # A folder of the checkpoint's own, named after its step, is filled (and replaced) as before.
    assert ck.restore_files(tmp_path / "ckpt-{step}").step == 1
    assert (tmp_path / "ckpt-1" / "weights.bin").read_bytes() == b"w" * 100
    # So is one restore_files filled before, though the next checkpoint's files have other names.
    mine = tmp_path / "mine"
    assert ck.restore_files(mine).step == 1
    (src / "weights.bin").unlink()
    (src / "weights-2.bin").write_bytes(b"v" * 100)
    ck.save_files(step=2, files=src)
    assert ck.restore_files(mine).step == 2
    assert sorted(p.name for p in mine.iterdir() if not p.name.startswith(".")) == ["weights-2.bin"]
    # A folder filled so and saved again holds the trainer's files alone.
    assert ck.save_files(step=3, files=mine)[0].sizes == {"weights-2.bin": 100}
    ck.close()


def _nas_beside_scratch(tmp_path, keep=5):
    """A config resuming to "scratch" and "nas", with steps 1 and 2 saved to both by a training."""
    cfg = local_config(tmp_path, final=False, keep=keep)
    cfg["backends"]["nas"] = {"type": "local", "path": str(tmp_path / "nas")}
    cfg["roles"]["resume"]["backends"] = ["scratch", "nas"]
    with CheckpointManager.from_config(cfg) as other:
        model, opt = make_model()
        for step in (1, 2):
            train_step(model, opt)
            other.save(step=step, model=model, optimizer=opt)
    return cfg


def _nas_down(tmp_path):
    """A file where "nas"'s folder was: that store cannot be listed until ``_nas_up``."""
    os.rename(tmp_path / "nas", tmp_path / "nas-away")
    (tmp_path / "nas").write_text("a file where the folder was: the store cannot be listed")


def _nas_up(tmp_path):
    _nas_up(tmp_path)


def test_a_restore_from_one_backend_while_another_cannot_be_listed_says_so_to_the_caller(tmp_path):
    """The backend that could not be listed may hold newer steps than the one restored: that was
    only logged, and a trainer not showing ckptkit's log went on from an older step unaware. It is
    a RuntimeWarning now, and ``Restored.skipped`` says it."""
    cfg = _nas_beside_scratch(tmp_path)
    _nas_down(tmp_path)

    with CheckpointManager.from_config(cfg) as ck:
        with pytest.warns(RuntimeWarning, match=r"going on with what the other backends hold.*could not list: nas"):
            restored = ck.restore(model=make_model()[0])
    assert restored.step == 2 and restored.ref.backend == "scratch"
    assert len(restored.skipped) == 1 and "could not list: nas" in restored.skipped[0]


def test_a_step_that_failed_on_a_backend_down_at_restore_is_not_taken_for_ours_there(tmp_path):
    """Another training left steps 1 and 2 on "nas"; this one restored step 1 from "scratch"
    while "nas" was down, and saved step 2, which failed there. Once "nas" answered, its step 2
    (the other training's) counted as this training's own, and saves went on over it."""
    import shutil
    import warnings

    from ckptkit import RunConflictError, SaveError

    cfg = _nas_beside_scratch(tmp_path, keep=10)
    shutil.rmtree(tmp_path / "scratch/exp/step-0000000002")
    _nas_down(tmp_path)
    ck = CheckpointManager.from_config(cfg)
    model, opt = make_model(seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ck.restore(model=model, optimizer=opt).step == 1
    with pytest.raises(SaveError, match="nas"):
        ck.save(step=2, model=model, optimizer=opt)
    os.remove(tmp_path / "nas")
    os.rename(tmp_path / "nas-away", tmp_path / "nas")
    ck.save(step=3, model=model, optimizer=opt)  # committed; its prune finds the other training's step 2
    with pytest.raises(RunConflictError, match=r"already holds checkpoints up to step 2"):
        ck.save(step=4, model=model, optimizer=opt)
    ck.close()


def test_a_skipped_step_is_told_though_an_older_one_then_fails_the_restore(tmp_path, pm):
    """Restore warns of the damaged steps it skipped once no other rank waits for it; a step
    tried after them that fails the restore still leaves that warning given, and under -W
    error the failure raised is the restore's own."""
    ck = CheckpointManager.from_config(local_config(tmp_path, final=False), plugin_manager=pm)
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(b"w" * 100)
    ck.save_files(step=1, files=src)
    model, opt = make_model()
    ck.save(step=2, model=model, optimizer=opt)
    ck.close()
    state = tmp_path / "scratch" / "exp" / "step-0000000002" / STATE_FILE
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    ck = CheckpointManager.from_config(local_config(tmp_path, final=False), plugin_manager=pm)
    with pytest.warns(RuntimeWarning, match="skipped .*step-0000000002"), \
            pytest.raises(IncompatibleCheckpointError, match="folder of files committed by save_files"):
        ck.restore(*make_model(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(IncompatibleCheckpointError, match="folder of files committed by save_files"):
            ck.restore(*make_model(1))
    ck.close()


def test_export_with_replace_false_refuses_a_file_that_is_there_before_reading_anything(tmp_path, pm):
    """The API's own refusal, which ``ckptkit export`` without ``--force`` is: the file stays as
    it was, and one inside a checkpoint folder is refused as damaging that checkpoint first."""
    ck = CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm)
    ck.save(step=1, model=make_model()[0])
    out = tmp_path / "model.pt"
    out.write_bytes(b"someone's file")
    with pytest.raises(FileExistsError) as caught:
        ck.export(out, replace=False)
    assert caught.value.filename == str(out) and out.read_bytes() == b"someone's file"
    inside = tmp_path / "scratch" / "exp" / "step-0000000001" / STATE_FILE
    with pytest.raises(ckptkit.CkptkitError, match="lies inside checkpoint folder"):
        ck.export(inside, replace=False)
    assert ck.export(out).step == 1 and torch.load(out, weights_only=True)["step"] == 1
    ck.close()


def test_optimizer_takes_one_optimizer_and_says_how_to_save_several(tmp_path, pm):
    """A GAN's two optimizers passed as a list: save failed with a bare AttributeError from inside,
    and restore of an empty run returned None without a word."""
    gen, disc = torch.nn.Linear(4, 2), torch.nn.Linear(2, 1)
    opt_g, opt_d = torch.optim.Adam(gen.parameters()), torch.optim.Adam(disc.parameters())
    model = torch.nn.ModuleDict({"gen": gen, "disc": disc})
    several = r"optimizer= takes one optimizer, not a list\. For several .* extra= \(extra=\{'opt_d': opt_d\}"
    with CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm) as ck:
        with pytest.raises(TypeError, match=several):
            ck.restore(model=model, optimizer=[opt_g, opt_d])
        with pytest.raises(TypeError, match=several):
            ck.save(step=5, model=model, optimizer=[opt_g, opt_d])
        assert ck.list_checkpoints() == []
        (gen(torch.randn(3, 4)).sum() + disc(torch.randn(3, 2)).sum()).backward()
        opt_g.step()
        opt_d.step()
        ck.save(step=5, model=model, optimizer=opt_g, extra={"opt_d": opt_d})
    again = torch.nn.ModuleDict({"gen": torch.nn.Linear(4, 2), "disc": torch.nn.Linear(2, 1)})
    again_g, again_d = torch.optim.Adam(again["gen"].parameters()), torch.optim.Adam(again["disc"].parameters())
    with CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm) as ck:
        assert ck.restore(model=again, optimizer=again_g, extra={"opt_d": again_d}).step == 5
    assert torch.equal(again_d.state[again["disc"].weight]["exp_avg"], opt_d.state[disc.weight]["exp_avg"])
    assert torch.equal(again_g.state[again["gen"].weight]["exp_avg"], opt_g.state[gen.weight]["exp_avg"])


@pytest.mark.parametrize("value, shown", [("warmup", "'warmup'"), (None, "None"),
                                          (torch.ones(3), "a tensor of 3 elements"), ([0.5], "a list"),
                                          (10 ** 400, "an integer too large for a float")])
def test_a_metric_that_is_no_number_is_refused_by_name(tmp_path, pm, value, shown):
    model = torch.nn.Linear(4, 2)
    with CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm) as ck:
        with pytest.raises(ValueError, match=rf"metrics\['phase'\] is {shown}, not a number: a metric is a float, "
                                             r"an int or a tensor of one element"):
            ck.save(step=5, model=model, metrics={"loss": 0.5, "phase": value})
        assert ck.list_checkpoints() == []
        ck.save(step=5, model=model, metrics={"loss": torch.tensor(0.5), "phase": 2})
        assert ck.list_checkpoints()[0].step == 5


@pytest.mark.parametrize("publish_fails", [False, True], ids=["published", "publish-failed"])
def test_finalize_after_a_failed_async_save_tells_what_became_of_the_final_model(tmp_path, pm, publish_fails):
    """The last async save failed and finalize reports it: the error also says where the final
    model went, so that a failed publish's fallback folder and retry are not hidden behind the
    save's failure, and a publish that worked is not run again for nothing."""
    cfg = local_config(tmp_path)
    cfg["roles"]["resume"]["async"] = True
    fallback = tmp_path / "fallback"
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm, fallback_dir=fallback)
    model, opt = make_model()
    ck.save(step=0, model=model, optimizer=opt)
    ck.wait()
    (tmp_path / "scratch" / "exp").rename(tmp_path / "kept")
    (tmp_path / "scratch" / "exp").write_text("in the way")  # the next save's folder cannot be made
    if publish_fails:
        (tmp_path / "published").write_text("in the way")
    ck.save(step=1, model=model, optimizer=opt)
    with pytest.raises(SaveError) as info:
        ck.finalize(model=model, step=1)
    message = str(info.value)
    assert "step 1 was not saved to every resume backend (scratch:" in message
    if publish_fails:
        assert isinstance(info.value, PublishError) and set(info.value.failures) == {"published"}
        assert str(fallback) in message and "retry with: ckptkit publish" in message
        assert (fallback / "exp" / "final" / FINAL_FILE).is_file()
    else:
        assert not isinstance(info.value, PublishError) and set(info.value.failures) == {"scratch"}
        assert (tmp_path / "published" / "exp" / "final" / FINAL_FILE).is_file()
        assert f"published all the same, to file://{tmp_path / 'published'}" in message
        assert "finalize need not run again" in message
        assert [(r.backend, r.role) for r in info.value.saved] == [("published", "final")]
    ck.close()


NO_WRITER_THREAD = """
import os, sys, threading, torch, ckptkit
from ckptkit.plugins import make_plugin_manager
folder, copy = sys.argv[1], sys.argv[2]
ck = ckptkit.CheckpointManager.from_config(
    {"backends": {"disk": {"type": "local", "path": folder}},
     "roles": {"resume": {"backends": ["disk"], "every_n_steps": 1, "keep_last": 5, "async": True,
                          "async_copy": copy}}},
    run_name="exp", plugin_manager=make_plugin_manager(autoload=False))
torch.manual_seed(0)
model = torch.nn.Linear(64, 64)
opt = torch.optim.AdamW(model.parameters())
def train():
    opt.zero_grad()
    model(torch.randn(4, 64)).pow(2).mean().backward()
    opt.step()
train()
threading.stack_size(1 << 44)  # no thread can start: its stack cannot be mapped
try:
    ck.save(step=1, model=model, optimizer=opt)
except RuntimeError as exc:
    print("save 1:", exc)
threading.stack_size(0)
train()
ck.save(step=2, model=model, optimizer=opt)
ck.wait()
torch.save(model.state_dict(), folder + "/expected.pt")
ck.close()
"""


@pytest.mark.parametrize("copy", ["blocking", "optimizer_state", "background"])
def test_an_async_save_whose_writer_thread_cannot_start_writes_nothing_ever(tmp_path, pm, copy):
    """No memory for the writer thread's stack (memory-tight probe): save raised, yet its write
    stayed queued and ran with the next save's thread, committing step 1 with step 2's weights."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", NO_WRITER_THREAD, str(tmp_path), copy],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "save 1: can't start new thread" in proc.stdout, proc.stdout
    assert sorted(n for n in os.listdir(tmp_path / "exp") if n.startswith("step-")) == ["step-0000000002"]
    model = torch.nn.Linear(64, 64)
    ck = CheckpointManager.from_config(
        {"backends": {"disk": {"type": "local", "path": str(tmp_path)}}, "roles": {"resume": {"backends": ["disk"]}}},
        run_name="exp", plugin_manager=pm)
    assert ck.restore(model).step == 2
    assert_same_state(model.state_dict(), torch.load(tmp_path / "expected.pt", weights_only=True))
    ck.close()


def test_a_failed_async_save_is_reported_when_the_next_save_fails_before_it_would_have_been(tmp_path, pm, caplog):
    """The next save collects the failed save's outcome, then fails itself before reporting it
    (memory-tight probe: its staging ran out of memory): the earlier failure went unsaid. It is
    logged as an error, and the next save's own error is raised as it was."""
    cfg = local_config(tmp_path, final=False)
    cfg["roles"]["resume"]["async"] = True
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "exp").write_text("in the way")  # step 0's folder cannot be made
    ck.save(step=0, model=model, optimizer=opt)

    def refuses():
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    opt.state_dict = refuses
    with caplog.at_level(logging.ERROR, logger="ckptkit.manager"), pytest.raises(RuntimeError, match="allocate"):
        ck.save(step=1, model=model, optimizer=opt)
    told = [r.getMessage() for r in caplog.records if r.name == "ckptkit.manager" and r.levelno == logging.ERROR]
    assert len(told) == 1 and told[0].startswith("step 0 was not saved to every resume backend"), told
    assert "the save after it failed too" in told[0]
    del opt.state_dict
    (tmp_path / "scratch" / "exp").unlink()
    ck.save(step=2, model=model, optimizer=opt)
    assert [r.step for r in ck.wait()] == [2]
    ck.close()


OUT_OF_MEMORY_LATER = """
import json, resource, sys, threading, warnings, torch, ckptkit
from ckptkit.plugins import make_plugin_manager
folder, scenario, headroom = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = {"backends": {"disk": {"type": "local", "path": folder}, "out": {"type": "local", "path": folder + "/final"}},
          "roles": {"resume": {"backends": ["disk"], "every_n_steps": 1, "keep_last": 3},
                    "final": {"backends": ["out"], "dtype": "bfloat16"}}}
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Linear(2048, 2048)
opt = torch.optim.AdamW(model.parameters())
model(torch.ones(2, 2048)).sum().backward()
opt.step()
pm = make_plugin_manager(autoload=False)
ck = ckptkit.CheckpointManager.from_config(config, run_name="exp", plugin_manager=pm)
if scenario != "restore":
    ck.save(step=1, model=model, optimizer=opt)
if scenario == "save":
    ck.close()
    sys.exit()
if scenario == "restore":
    ck.close()
    ck = ckptkit.CheckpointManager.from_config(config, run_name="exp", plugin_manager=pm)
    model = torch.nn.Linear(2048, 2048)
    opt = torch.optim.AdamW(model.parameters())
threading.stack_size(1 << 18)
size = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
told = {}
resource.setrlimit(resource.RLIMIT_AS, (size + headroom * 2**20, resource.RLIM_INFINITY))
try:
    if scenario == "restore":
        ck.restore(model, opt)
    else:
        ck.finalize(model, step=1)
    told["limited"] = "worked"
except BaseException as exc:
    told["limited"] = f"{type(exc).__name__}: {exc}"
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
told["optimizer_state"] = len(opt.state)
if scenario == "restore":
    told["then"] = ck.restore(model, opt).step
else:
    told["then"] = [r.step for r in ck.finalize(model, step=1)]
ck.close()
print(json.dumps(told))
"""


@pytest.mark.parametrize("scenario, headroom_mib", [("restore", 60), ("finalize", 4)])
def test_running_out_of_memory_copying_a_restore_or_casting_a_final_model_says_what_and_keeps_everything(
        tmp_path, scenario, headroom_mib):
    """Memory-tight probe: a restore that ran out of memory copying the optimizer's state out of
    the mapped file, and a finalize casting the model to bfloat16, raised torch's bare allocator
    error. Now a MemoryError saying what ran out and what to do; nothing half loaded, nothing
    lost, and the same call works once memory is back."""
    import json
    import subprocess
    import sys

    def child(*args):
        proc = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY_LATER, str(tmp_path), *args],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.strip().splitlines()

    if scenario == "restore":
        child("save", "0")  # in a process of its own, whose freed memory the restore cannot reuse
    told = json.loads(child(scenario, str(headroom_mib))[-1])
    if scenario == "restore":
        assert told["limited"].startswith(f"MemoryError: file://{tmp_path}/exp/step-0000000001: this machine ran "
                                          "out of memory copying the state out of"), told
        assert told["optimizer_state"] == 0 and told["then"] == 1
    else:
        assert told["limited"].startswith("MemoryError: finalize step 1: this machine ran out of memory gathering "
                                          "the final model and casting it to bfloat16"), told
        assert "ckptkit publish" in told["limited"] and "--step 1" in told["limited"]
        assert told["then"] == [1]
