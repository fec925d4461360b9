"""Republishing a stored final or resume checkpoint through the final backends, without retraining."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap

import attrs
import pytest
import torch

import ckptkit
from ckptkit import CheckpointManager, CheckpointError, ConfigError, PublishError
from ckptkit.checkpoint import CheckpointRef
from ckptkit.cli import main
from ckptkit.local import LocalBackend
from ckptkit.publish import find_source, publish, source_from_folder

from ckpt_helpers import rewrite_manifest


def _model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _config(tmp_path, dtype=None):
    final = {"backends": ["archive"]}
    if dtype:
        final["dtype"] = dtype
    return {"run_name": "exp", "algorithm": "sft",
            "backends": {"scratch": {"type": "local", "path": str(tmp_path / "scratch")},
                         "archive": {"type": "local", "path": str(tmp_path / "archive")}},
            "roles": {"resume": {"backends": ["scratch"], "every_n_steps": 2, "keep_last": 2},
                      "final": final}}


def _train(ck, model, opt, steps=6):
    for step in range(steps):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ck.save(step=step, epoch=step // 3, model=model, optimizer=opt, metrics={"loss": loss.item()})


def _final_body(tmp_path):
    path = tmp_path / "archive" / "exp" / "final" / "final_model.pt"
    return torch.load(path, weights_only=True)


def test_a_final_left_in_the_fallback_is_published_once_the_backend_works(tmp_path):
    blocker = tmp_path / "archive"
    blocker.write_text("not a folder")  # the archive cannot be created: its backend fails
    fallback = tmp_path / "fallback"
    ck = CheckpointManager.from_config(_config(tmp_path), fallback_dir=fallback)
    model, opt = _model()
    _train(ck, model, opt)
    with pytest.raises(PublishError, match=str(fallback)):
        ck.finalize(model=model, step=5, epoch=1, metrics={"loss": 0.5})
    ck.close()
    blocker.unlink()

    ck = CheckpointManager.from_config(_config(tmp_path), fallback_dir=fallback)
    source = find_source(ck)
    assert (source.kind, source.backend, source.manifest.step) == ("final", None, 5)
    result = publish(ck, source)
    assert result.ok and [r.backend for r in result.published] == ["archive"]
    fb_bytes = (fallback / "exp" / "final" / "final_model.pt").read_bytes()
    assert (tmp_path / "archive" / "exp" / "final" / "final_model.pt").read_bytes() == fb_bytes
    body = _final_body(tmp_path)
    assert body["step"] == 5 and body["algorithm"] == "sft"
    assert torch.equal(body["model"]["0.weight"], model.state_dict()["0.weight"])
    ck.close()


def test_a_resume_checkpoint_is_published_as_the_final_model(tmp_path):
    ck = CheckpointManager.from_config(_config(tmp_path, dtype="bfloat16"))
    model, opt = _model()
    _train(ck, model, opt)
    source = find_source(ck, step=4)
    assert source.kind == "resume"
    result = publish(ck, source)
    assert result.ok
    body = _final_body(tmp_path)
    assert body["step"] == 4 and body["epoch"] == 1 and body["algorithm"] == "sft"
    assert set(body["metrics"]) == {"loss"}
    assert body["model"]["0.weight"].dtype == torch.bfloat16
    saved = torch.load(source.ref.local_dir + "/state.pt", weights_only=True)["model"]["2.bias"]
    assert torch.equal(body["model"]["2.bias"], saved.to(torch.bfloat16))
    assert not torch.equal(saved, model.state_dict()["2.bias"])  # step 5 trained on past it
    assert "optimizer" not in body
    ck.close()


def test_a_backend_already_holding_the_same_bytes_is_not_written_again(tmp_path):
    ck = CheckpointManager.from_config(_config(tmp_path))
    model, opt = _model()
    _train(ck, model, opt)
    ck.finalize(model=model, step=5, epoch=1)
    manifest = tmp_path / "archive" / "exp" / "final" / "manifest.json"
    before = manifest.read_bytes()
    result = publish(ck, find_source(ck))
    assert [r.backend for r in result.already_held] == ["archive"] and not result.published
    assert manifest.read_bytes() == before
    result = publish(ck, find_source(ck), force=True)
    assert [r.backend for r in result.published] == ["archive"]
    assert json.loads(manifest.read_bytes())["created"] >= json.loads(before)["created"]
    ck.close()


def test_a_tampered_source_is_refused(tmp_path):
    ck = CheckpointManager.from_config(_config(tmp_path))
    model, opt = _model()
    _train(ck, model, opt)
    ck.finalize(model=model, step=5)
    folder = tmp_path / "archive" / "exp" / "final"
    with open(folder / "final_model.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(CheckpointError, match="does not match"):
        publish(ck, source_from_folder(folder), force=True)
    ck.close()


def test_a_source_folder_whose_file_is_a_pipe_is_refused_unread(tmp_path):
    """A pipe in a state file's place: hashing it waited for a writer forever."""
    import threading

    ck = CheckpointManager.from_config(_config(tmp_path))
    model, opt = _model()
    _train(ck, model, opt)
    folder = next((tmp_path / "scratch" / "exp").glob("step-*"))
    os.remove(folder / "state.pt")
    os.mkfifo(folder / "state.pt")
    out = {}

    def run():
        try:
            publish(ck, source_from_folder(folder))
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)  # a bound on a hang, not a speed goal
    assert not thread.is_alive(), "publish waited on the pipe"
    assert isinstance(out.get("error"), CheckpointError) and "not a regular file" in str(out["error"])
    ck.close()


def test_a_source_folder_whose_file_is_a_link_is_refused_unread(tmp_path):
    """A checkpoint folder named by --from whose state file is a link (to the same bytes, so the
    checksum matches): ckptkit writes none, and the link's target may change between the check
    and the read."""
    ck = CheckpointManager.from_config(_config(tmp_path))
    model, opt = _model()
    _train(ck, model, opt)
    folder = next((tmp_path / "scratch" / "exp").glob("step-*"))
    copy = tmp_path / "elsewhere" / "state.pt"
    copy.parent.mkdir()
    os.replace(folder / "state.pt", copy)
    os.symlink(copy, folder / "state.pt")
    with pytest.raises(CheckpointError, match="not a regular file"):
        publish(ck, source_from_folder(folder))
    assert not (tmp_path / "archive" / "exp").exists()
    ck.close()


def test_a_final_file_replaced_while_it_is_being_published_fails_the_publish(tmp_path, monkeypatch):
    """A backend may send a local final file by its path, after the check: one replaced then
    (another program writing into the folder) is found out once it was sent."""
    from ckptkit import fanout

    ck = CheckpointManager.from_config(_config(tmp_path))
    model, opt = _model()
    _train(ck, model, opt)
    ck.finalize(model=model, step=5)
    folder = tmp_path / "archive" / "exp" / "final"
    other = tmp_path / "other.pt"
    torch.save({"model": {}}, other)
    real = fanout.store_each

    def store_each(*args, **kwargs):
        os.replace(other, folder / "final_model.pt")
        return real(*args, **kwargs)

    monkeypatch.setattr(fanout, "store_each", store_each)
    with pytest.raises(CheckpointError, match="final_model.pt changed while it was being read"):
        publish(ck, source_from_folder(folder), force=True)
    ck.close()


def test_errors_name_what_is_missing(tmp_path):
    ck = CheckpointManager.from_config(_config(tmp_path), fallback_dir=tmp_path / "fb")
    with pytest.raises(CheckpointError, match="--step"):
        find_source(ck)
    model, opt = _model()
    _train(ck, model, opt)
    with pytest.raises(ckptkit.CheckpointNotFoundError, match="no committed checkpoint of step 3 .*newest first: 4, 2"):
        find_source(ck, step=3)
    with pytest.raises(ConfigError, match="scratch: not a final backend"):
        publish(ck, find_source(ck, step=4), backends=["scratch"])
    with pytest.raises(CheckpointError, match="manifest.json"):
        source_from_folder(tmp_path)
    ck.close()


def _trained_config_file(tmp_path, monkeypatch):
    """A config file in the working folder, and a training of it saved (resume steps 4 and 5)."""
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "ckptkit.yaml"
    cfg.write_text(json.dumps(_config(tmp_path)))
    ck = CheckpointManager.from_config(str(cfg))
    model, opt = _model()
    _train(ck, model, opt)
    ck.close()
    return cfg


def test_cli_publish(tmp_path, monkeypatch, capsys):
    cfg = _trained_config_file(tmp_path, monkeypatch)
    assert main(["publish", str(cfg), "--step", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["source"]["kind"] == "resume" and data["published"][0]["backend"] == "archive"
    assert os.path.exists(tmp_path / "archive" / "exp" / "final" / "final_model.pt")
    assert main(["publish", str(cfg), "--step", "99"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ckptkit: error:") and "step 99" in err and "\n" not in err


def test_cli_publish_titles_its_table_by_what_happened(tmp_path, monkeypatch, capsys, cli_columns):
    cli_columns(200)
    cfg = _trained_config_file(tmp_path, monkeypatch)
    blocker = tmp_path / "archive"
    blocker.write_text("not a folder")  # the only final backend fails
    assert main(["publish", str(cfg), "--step", "4"]) == 1
    out = capsys.readouterr().out
    assert "run 'exp': did not publish the resume checkpoint of step 4" in out and "FAILED" in out
    assert "published the" not in out
    blocker.unlink()
    assert main(["publish", str(cfg), "--step", "4"]) == 0
    assert "run 'exp': published the resume checkpoint of step 4" in capsys.readouterr().out
    # Again: every backend holds it, and the title says that nothing was published.
    assert main(["publish", str(cfg), "--step", "4"]) == 0
    out = capsys.readouterr().out
    assert "run 'exp': nothing to publish, the resume checkpoint of step 4" in out and "is held already" in out
    assert "already held" in out and "published the" not in out


def test_a_sharded_resume_checkpoint_is_published_as_the_final_model(tmp_path):
    cfg = _config(tmp_path)
    cfg["roles"]["resume"]["format"] = "dcp"
    ck = CheckpointManager.from_config(cfg)
    model, opt = _model()
    _train(ck, model, opt, steps=5)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    result = publish(ck, find_source(ck, step=4))
    assert result.ok
    body = _final_body(tmp_path)
    assert body["step"] == 4 and body["model"].keys() == expected.keys()
    assert all(torch.equal(body["model"][k], expected[k]) for k in expected)
    ck.close()


def test_publishing_a_resume_step_twice_writes_it_once(tmp_path):
    ck = CheckpointManager.from_config(_config(tmp_path))
    model, opt = _model()
    _train(ck, model, opt)
    first = publish(ck, find_source(ck, step=4))
    assert [r.backend for r in first.published] == ["archive"]
    manifest = tmp_path / "archive" / "exp" / "final" / "manifest.json"
    before = manifest.read_bytes()
    again = publish(ck, find_source(ck, step=4))
    assert [r.backend for r in again.already_held] == ["archive"] and not again.published
    assert manifest.read_bytes() == before
    ck.close()


def test_a_final_model_whose_bytes_changed_since_is_not_already_held_and_is_sent_again(tmp_path):
    """Its manifest and size as they were, a byte of it changed (a disk's damage, a hand's):
    publish reads the copy back before it calls it held, and stores the model beside it."""
    ck = CheckpointManager.from_config(_config(tmp_path))
    model, opt = _model()
    _train(ck, model, opt)
    assert [r.backend for r in publish(ck, find_source(ck, step=4)).published] == ["archive"]
    stored = tmp_path / "archive" / "exp" / "final" / "final_model.pt"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 1
    stored.write_bytes(bytes(data))
    again = publish(ck, find_source(ck, step=4))
    assert [r.backend for r in again.published] == ["archive"] and not again.already_held
    assert again.published[0].path.endswith("/final-2")
    repaired = ck.router.instances["archive"].final_ref(run_name="exp")
    assert repaired.path.endswith("/final-2")
    ck.reader.verify(repaired)
    ck.close()


def test_a_final_model_in_a_resume_backend_is_never_taken_for_the_runs_newest(tmp_path):
    """A final-looking folder in a store the final role does not use (written by hand, or by
    whoever may write there), newer by its manifest: publish goes by the final backends."""
    ck = CheckpointManager.from_config(_config(tmp_path))
    model, opt = _model()
    _train(ck, model, opt)
    ck.finalize(model=model, step=5, epoch=1)
    planted = tmp_path / "scratch" / "exp" / "final-7"
    shutil.copytree(tmp_path / "archive" / "exp" / "final", planted)
    rewrite_manifest(planted, created="9999-12-31T23:59:59+00:00", step=6)
    source = find_source(ck)
    assert source.backend == "archive" and source.manifest.step == 5
    ck.close()


class _Registry:
    """A final backend that, like a model registry, keeps no files but can say what it holds."""

    calls: list = []
    holds: object = None  # a CheckpointRef, None, or an exception to raise

    @classmethod
    def from_config(cls, name, options):
        return cls(name)

    def __init__(self, name):
        self.name = name

    @ckptkit.hookimpl
    def find_published(self, run_name, digest, algorithm):
        self.calls.append(("find_published", digest, algorithm))
        if isinstance(self.holds, Exception):
            raise self.holds
        return self.holds

    @ckptkit.hookimpl
    def publish_final(self, run_name, payload, stored, algorithm, model):
        self.calls.append(("publish_final", payload.files[0].expected.digest, algorithm))
        return CheckpointRef(backend=self.name, run_name=run_name, step=payload.step, path="r/1",
                             uri="registry://r/1", role="final")


def test_a_registry_is_asked_whether_it_holds_the_bytes_before_it_is_sent_them(tmp_path, pm):
    from ckptkit.errors import BackendError

    pm.add_backend_type("registry", _Registry)
    cfg = _config(tmp_path)
    cfg["backends"]["registry"] = {"type": "registry"}
    cfg["roles"]["final"]["backends"] = ["archive", "registry"]
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = _model()
    _train(ck, model, opt)
    _Registry.calls = []
    ck.finalize(model=model, step=5)
    digest = json.loads((tmp_path / "archive" / "exp" / "final" / "manifest.json").read_text())["files"]["final_model.pt"]["digest"]
    assert _Registry.calls == [("publish_final", digest, "sft")]

    held = CheckpointRef(backend="registry", run_name="exp", step=5, path="r/1", uri="registry://r/1", role="final")
    cases = [(held, False, [("find_published", digest, "sft")]),
             (BackendError("registry", "registry down"), False, [("find_published", digest, "sft")]),
             (BackendError("registry", "registry down"), True, [("publish_final", digest, "sft")])]
    # A plugin's own bug in find_published, raised or returned, fails that backend by name.
    bug = "find_published (type 'registry', from <registered in code>)"
    cases += [(KeyError("region"), False, [("find_published", digest, "sft")]),
              ("models:/m/1", False, [("find_published", digest, "sft")])]
    # Another run's version, answered as this run's: it was taken for held, and nothing sent.
    theirs = attrs.evolve(held, run_name="other")
    cases += [(theirs, False, [("find_published", digest, "sft")])]
    for holds, force, calls in cases:
        _Registry.holds, _Registry.calls = holds, []
        result = publish(ck, find_source(ck), force=force)
        assert _Registry.calls == calls
        if holds is theirs:
            assert list(result.failures) == ["registry"] and "registry" not in [r.backend for r in result.already_held]
            assert "returned a ref of backend 'registry', run 'other'" in result.failures["registry"], result.failures
        elif isinstance(holds, (KeyError, str)):
            assert list(result.failures) == ["registry"] and not result.published, result.failures
            told = result.failures["registry"]
            assert bug in told and "report it to" in told, told
            assert ("raised KeyError" in told) if isinstance(holds, KeyError) else ("returned str" in told), told
        elif holds is held:
            assert result.already_held == (find_source(ck).ref, held) and result.ok
        elif not force:
            assert result.failures == {"registry": "backend 'registry': registry down"} and not result.published
        else:
            assert [r.backend for r in result.published] == ["archive", "registry"]
    ck.close()


class _RunsCode:
    def __init__(self, marker):
        self.marker = os.fspath(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_final_file_that_runs_code_is_refused_and_not_passed_on(tmp_path):
    from ckptkit import UnsafeCheckpointError
    from ckptkit.local import LocalBackend

    ck = CheckpointManager.from_config(_config(tmp_path))
    marker = tmp_path / "ran"
    # A final model whose manifest agrees with it, but whose pickle runs a command when loaded.
    fb = LocalBackend.from_config("fallback", {"path": str(tmp_path / "fb")})
    payload = ckptkit.checkpoint.Payload(
        run_name="exp", step=5, epoch=None, format="torch", role="final",
        files=(ckptkit.checkpoint.PayloadFile("final_model.pt", write=lambda f: torch.save(
            {"model": {"w": torch.zeros(2)}, "hook": _RunsCode(marker)}, f)),))
    fb.publish_final(run_name="exp", payload=payload)
    with pytest.raises(UnsafeCheckpointError):
        publish(ck, find_source(ck, fallback_dir=tmp_path / "fb"))
    assert not marker.exists() and not (tmp_path / "archive" / "exp" / "final").exists()
    ck.close()


def _small_disk() -> None:
    """No file past 16 KiB in this process (EFBIG, SIGXFSZ ignored): a full disk on this machine."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_a_full_scratch_disk_while_publishing_is_named_not_torchs_unexpected_pos(tmp_path):
    """The final model publish makes is written into a scratch folder first; on a full disk
    torch.save reported its write failing as "unexpected pos 896 vs 790", with a traceback."""
    cfg = {"run_name": "exp", "backends": {"scratch": {"type": "local", "path": str(tmp_path / "ck")},
                                           "published": {"type": "local", "path": str(tmp_path / "final")}},
           "roles": {"resume": {"backends": ["scratch"], "every_n_steps": 1}, "final": {"backends": ["published"]}}}
    with CheckpointManager.from_config(cfg) as ck:
        ck.save(step=1, model=torch.nn.Linear(256, 64))
    child = textwrap.dedent("""
        import json, sys, ckptkit
        from ckptkit.publish import find_source, publish
        with ckptkit.CheckpointManager.from_config(json.loads(sys.argv[1])) as ck:
            try:
                publish(ck, find_source(ck, step=1))
                print(json.dumps(None))
            except Exception as exc:
                print(json.dumps([type(exc).__name__, str(exc), repr(exc.__cause__)]))
    """)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    run = subprocess.run([sys.executable, "-c", child, json.dumps(cfg)], env={**os.environ, "TMPDIR": str(scratch)},
                         preexec_fn=_small_disk, capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stderr
    kind, text, cause = json.loads(run.stdout.strip().splitlines()[-1])
    assert kind == "LocalWriteError", text
    assert f"could not write {scratch}" in text and "(the final model made from file://" in text, text
    assert "File too large" in text and "point TMPDIR at a folder with room" in text, text
    assert cause.startswith("OSError(27, "), cause
    assert os.listdir(scratch) == [] and not (tmp_path / "final" / "exp" / "final").exists()


def test_publish_with_only_a_registry_as_final_says_the_registry_keeps_no_copy_to_send(tmp_path, pm):
    """Run after finalize registered the model, publish said the run had no stored final model,
    which read as if finalize had published nothing."""
    class Registered(_Registry):
        @ckptkit.hookimpl
        def publish_final(self, run_name, payload, stored, algorithm, model):
            return CheckpointRef(backend=self.name, run_name=run_name, step=payload.step, path="r/1",
                                 uri="registry://r/1", role="final")

    pm.add_backend_type("registry", Registered)
    cfg = _config(tmp_path)
    cfg["backends"]["registry"] = {"type": "registry"}
    cfg["roles"]["final"]["backends"] = ["registry"]
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm, fallback_dir=tmp_path / "fallback")
    model, opt = _model()
    _train(ck, model, opt)
    assert [r.uri for r in ck.finalize(model=model, step=5)] == ["registry://r/1"]
    with pytest.raises(ckptkit.CheckpointError, match=r"has no stored final model in its backends \(registry keeps no "
                                                      r"copy that publish can read back, as a model registry does, "
                                                      r"whatever it holds\) nor in the fallback folder .*--step STEP"):
        find_source(ck)
    ck.close()


def _swapped_in(tmp_path, source: str, dest: str) -> None:
    """Replace folder ``dest`` (under tmp_path) by a copy of folder ``source``, as it is."""
    import shutil

    shutil.rmtree(tmp_path / dest, ignore_errors=True)
    shutil.copytree(tmp_path / source, tmp_path / dest)


def test_a_resume_step_whose_manifest_is_another_runs_is_refused_not_published_as_this_runs(tmp_path):
    """Another run's step folder copied over this run's step 4: publish --step 4 sent it as this
    run's final model, and sealed it under this run's name, where restore and verify refuse it."""
    other = {**_config(tmp_path), "run_name": "other"}
    theirs = CheckpointManager.from_config(other)
    _train(theirs, *_model(1), steps=9)
    theirs.close()
    ck = CheckpointManager.from_config(_config(tmp_path))
    _train(ck, *_model())
    _swapped_in(tmp_path, "scratch/other/step-0000000008", "scratch/exp/step-0000000004")
    with pytest.raises(ckptkit.CorruptCheckpointError, match="belongs to run 'other'"):
        find_source(ck, step=4)
    cfg = tmp_path / "ckptkit.yaml"
    cfg.write_text(json.dumps(_config(tmp_path)))
    assert main(["publish", str(cfg), "--step", "4"]) == 1
    assert not (tmp_path / "archive" / "exp").exists()
    ck.close()


def test_a_stored_final_that_is_another_runs_is_not_published_as_this_runs(tmp_path):
    """Another run's final folder in this run's fallback folder (or final backend) was published,
    and the new manifest said it was this run's."""
    fallback = tmp_path / "fallback"
    other = {**_config(tmp_path), "run_name": "other"}
    theirs = CheckpointManager.from_config(other)
    model, opt = _model(1)
    _train(theirs, model, opt)
    theirs.finalize(model=model, step=5)
    theirs.close()
    _swapped_in(tmp_path, "archive/other/final", "fallback/exp/final")
    ck = CheckpointManager.from_config(_config(tmp_path), fallback_dir=fallback)
    with pytest.warns(RuntimeWarning, match="belongs to run 'other'"), \
            pytest.raises(CheckpointError, match="no stored final model"):
        find_source(ck)
    _swapped_in(tmp_path, "archive/other/final", "archive/exp/final")
    with pytest.warns(RuntimeWarning, match="belongs to run 'other'"), \
            pytest.raises(CheckpointError, match="no stored final model"):
        find_source(ck)
    # This run's own final model is still found beside one that is not.
    mine, opt = _model()
    _train(ck, mine, opt)
    (tmp_path / "archive" / "exp" / "final").rename(tmp_path / "foreign")
    ck.finalize(model=mine, step=5)
    _swapped_in(tmp_path, "foreign", "fallback/exp/final")
    with pytest.warns(RuntimeWarning, match="belongs to run 'other'"):
        source = find_source(ck)
    assert source.backend == "archive" and source.manifest.run_name == "exp"
    ck.close()


class _BuggyFinals(LocalBackend):
    @ckptkit.hookimpl
    def final_ref(self, run_name):
        raise KeyError("region")


def test_a_final_ref_that_fails_as_a_plugins_bug_is_named_not_a_traceback(tmp_path, pm, capsys):
    """A plugin's final_ref raising KeyError ended ckptkit publish with a raw traceback."""
    pm.add_backend_type("buggy", _BuggyFinals)
    cfg = _config(tmp_path)
    cfg["backends"]["archive"]["type"] = "buggy"
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    with pytest.raises(ckptkit.BackendError, match=r"final_ref \(type 'buggy', from <registered in code>\) raised "
                                                   r"KeyError: 'region'; report it to the plugin's authors"):
        find_source(ck)
    ck.close()


def test_a_damaged_final_model_is_passed_over_for_the_fallbacks_and_repaired_by_a_publish(tmp_path):
    """A final backend whose final manifest is damaged was taken for one holding nothing: publish
    found the fallback's model and sent it there, repairing the damaged one."""
    fallback = tmp_path / "fallback"
    ck = CheckpointManager.from_config(_config(tmp_path), fallback_dir=fallback)
    model, opt = _model()
    _train(ck, model, opt)
    ck.finalize(model=model, step=5)
    import shutil

    shutil.copytree(tmp_path / "archive" / "exp" / "final", fallback / "exp" / "final")
    manifest = tmp_path / "archive" / "exp" / "final" / "manifest.json"
    manifest.write_text(manifest.read_text()[:-20])
    with pytest.warns(RuntimeWarning, match="backend 'archive': its final model of run 'exp' is not published"):
        source = find_source(ck)
    assert source.backend is None and source.manifest.step == 5  # the fallback's
    with pytest.warns(RuntimeWarning, match="is not published"):
        result = publish(ck, find_source(ck))
    assert [r.backend for r in result.published] == ["archive"] and result.ok
    assert find_source(ck).backend == "archive"  # repaired
    ck.close()
