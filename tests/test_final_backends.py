"""Third-party final-only backends beside the built-in ones: a model zoo that converts the model,
and backends that fail or answer oddly. None of them may stop the other final backends, the
fallback copy lands whenever no backend holds ``final_model.pt`` where ``ckptkit publish`` can
read it back, and a converting backend gets the state itself, at ``finalize`` and ``publish``."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Mapping

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckptkit
from ckptkit import CheckpointManager, PublishError
from ckptkit.checkpoint import CheckpointRef
from ckptkit.cli import main
from ckptkit.config import check_options
from ckptkit.gather import DTYPES

FINAL = "final_model.pt"


class ModelZoo:
    """A final-only backend that keeps each final model as ``model.safetensors``, in a dtype of its own.

    It converts the state it is handed and never reads ``final_model.pt``. Its ref points at a
    local folder (``local_dir``) that holds no ckptkit manifest, and its ``sizes`` name the
    file it wrote: a converted model, not a copy of the final file.
    """

    OPTIONS = ("path", "fail", "dtype")
    received: list = []

    @classmethod
    def from_config(cls, name, options):
        check_options(f"backends.{name}", options, cls.OPTIONS, required=("path",))
        return cls(name, options["path"], options.get("fail", False), options.get("dtype"))

    def __init__(self, name, root, fail, dtype):
        self.name, self.root, self.fail, self.dtype = name, root, fail, dtype

    @ckptkit.hookimpl
    def publish_final(self, run_name, payload, state):
        if self.fail:
            raise ConnectionError("the zoo's upload server answered 503")
        ModelZoo.received.append(state)
        dtype = DTYPES[self.dtype] if self.dtype else None
        tensors = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).contiguous() for k, v in state.items()}
        folder = os.path.join(self.root, run_name, f"v{payload.step}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "model.safetensors")
        save_file(tensors, path, metadata={"run": run_name, "step": str(payload.step)})
        return CheckpointRef(backend=self.name, run_name=run_name, step=payload.step, path=folder,
                             uri="file://" + folder, role="final", local_dir=folder,
                             sizes={"model.safetensors": os.path.getsize(path)})


class Shelf:
    """A final-only backend that keeps the final file as it is, in a layout of its own.

    Like the zoo it returns ``local_dir`` and implements no ``read_manifest``; unlike it, its
    ref says nothing about the files it holds.
    """

    @classmethod
    def from_config(cls, name, options):
        return cls(name, options["path"])

    def __init__(self, name, root):
        self.name, self.root = name, root

    @ckptkit.hookimpl
    def publish_final(self, run_name, payload):
        folder = os.path.join(self.root, run_name)
        os.makedirs(folder, exist_ok=True)
        for pf in payload.files:
            with open(os.path.join(folder, pf.name), "wb") as f:
                pf.write_to(f)
        return CheckpointRef(backend=self.name, run_name=run_name, step=payload.step, path=folder,
                             uri="file://" + folder, role="final", local_dir=folder)


class Odd:
    """A final backend that misbehaves in the way its ``how`` option names."""

    @classmethod
    def from_config(cls, name, options):
        return cls(name, options["how"], options["path"])

    def __init__(self, name, how, root):
        self.name, self.how, self.root = name, how, root

    def _ref(self, run_name, step):
        return CheckpointRef(backend=self.name, run_name=run_name, step=step, path=self.root,
                             uri="file://" + self.root, role="final", local_dir=self.root)

    @ckptkit.hookimpl
    def publish_final(self, run_name, payload):
        if self.how == "raises":
            raise RuntimeError("odd went wrong")
        if self.how == "returns None":
            return None
        return self._ref(run_name, payload.step)

    @ckptkit.hookimpl
    def read_manifest(self, ref):
        if self.how == "manifest raises":
            raise OSError("odd cannot read its manifest back")
        # "manifest lacks the file": a manifest of something else.
        return ckptkit.checkpoint.Payload(run_name=ref.run_name, step=ref.step, epoch=None, format="torch",
                                          files=(), role="final").manifest({})


class Recorder:
    """A registry-like final backend, called last, that records the ``stored`` it was given."""

    seen: list = []

    @classmethod
    def from_config(cls, name, options):
        return cls(name)

    def __init__(self, name):
        self.name = name

    @ckptkit.hookimpl(trylast=True)
    def publish_final(self, run_name, payload, stored):
        Recorder.seen.append(list(stored))
        return CheckpointRef(backend=self.name, run_name=run_name, step=payload.step, path="r/1",
                             uri="registry://r/1", role="final")


@pytest.fixture
def zoo_pm(pm):
    for name, cls in (("zoo", ModelZoo), ("shelf", Shelf), ("odd", Odd), ("recorder", Recorder)):
        pm.add_backend_type(name, cls)
    ModelZoo.received, Recorder.seen = [], []
    return pm


@pytest.fixture
def zoo_dist(tmp_path, monkeypatch):
    """The zoo as an installed distribution, found through its entry point (the CLI builds its own
    plugin manager)."""
    site = tmp_path / "site"
    dist = site / "ckptkit_zoo-0.1.dist-info"
    dist.mkdir(parents=True)
    (site / "ckptkit_zoo.py").write_text(f"import sys\nModelZoo = sys.modules[{__name__!r}].ModelZoo\n")
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ckptkit-zoo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ckptkit.backends]\nzoo = ckptkit_zoo:ModelZoo\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("ckptkit_zoo", None)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def _config(tmp_path, final, **zoo):
    known = {"zoo": {"type": "zoo", "path": str(tmp_path / "zoo"), **zoo},
             "shelf": {"type": "shelf", "path": str(tmp_path / "shelf")},
             "archive": {"type": "local", "path": str(tmp_path / "archive")},
             "registry": {"type": "recorder"}}
    return {"run_name": "exp", "algorithm": "sft", "backends": {n: known[n] for n in final if n in known},
            "roles": {"final": {"backends": final}}}


def _same_state(got, model):
    want = model.state_dict()
    return isinstance(got, Mapping) and got.keys() == want.keys() and all(
        isinstance(got[k], torch.Tensor) and torch.equal(got[k], want[k]) for k in want)


def _archived(tmp_path):
    return torch.load(tmp_path / "archive" / "exp" / "final" / FINAL, weights_only=True)


def test_a_final_only_backend_that_sets_local_dir_does_not_stop_the_next_one(tmp_path, zoo_pm):
    ck = CheckpointManager.from_config(_config(tmp_path, ["shelf", "archive"]), plugin_manager=zoo_pm,
                                       fallback_dir=tmp_path / "fb")
    model = _model()
    refs = ck.finalize(model, step=3)
    ck.close()
    assert [r.backend for r in refs] == ["shelf", "archive"]
    assert _same_state(_archived(tmp_path)["model"], model)
    archived = (tmp_path / "archive" / "exp" / "final" / FINAL).read_bytes()
    assert (tmp_path / "shelf" / "exp" / FINAL).read_bytes() == archived
    assert not (tmp_path / "fb").exists()


def test_finalize_with_a_model_zoo_and_a_local_final_writes_both(tmp_path, zoo_pm):
    ck = CheckpointManager.from_config(_config(tmp_path, ["zoo", "archive", "registry"]), plugin_manager=zoo_pm,
                                       fallback_dir=tmp_path / "fb")
    model = _model()
    refs = ck.finalize(model, step=3)
    ck.close()
    assert [r.backend for r in refs] == ["zoo", "archive", "registry"]
    # The zoo got the state in memory, and converted it without reading any file.
    assert len(ModelZoo.received) == 1 and _same_state(ModelZoo.received[0], model)
    assert _same_state(load_file(tmp_path / "zoo" / "exp" / "v3" / "model.safetensors"), model)
    body = _archived(tmp_path)
    assert body["step"] == 3 and _same_state(body["model"], model)
    # A converted model is not a copy of final_model.pt: later backends are not told it is.
    assert [[r.backend for r in stored] for stored in Recorder.seen] == [["archive"]]
    assert not (tmp_path / "fb").exists()


def test_a_model_zoo_that_fails_lets_the_local_final_land_and_the_error_names_it(tmp_path, zoo_pm):
    ck = CheckpointManager.from_config(_config(tmp_path, ["zoo", "archive"], fail=True), plugin_manager=zoo_pm,
                                       fallback_dir=tmp_path / "fb")
    model = _model()
    with pytest.raises(PublishError) as info:
        ck.finalize(model, step=3)
    ck.close()
    message = str(info.value)
    assert "zoo" in message and "503" in message and "archive" not in info.value.failures
    assert set(info.value.failures) == {"zoo"} and [r.backend for r in info.value.saved] == ["archive"]
    assert str(tmp_path / "archive") in message and "ckptkit publish" in message
    assert _same_state(_archived(tmp_path)["model"], model)
    assert not (tmp_path / "fb").exists()  # the archive holds it: no second copy


@pytest.mark.parametrize("how, fails", [("raises", "odd went wrong"), ("returns None", "returned NoneType"),
                                        ("manifest raises", None), ("manifest lacks the file", None)])
def test_an_odd_final_backend_never_stops_the_others(tmp_path, zoo_pm, how, fails):
    cfg = _config(tmp_path, ["odd", "archive"])
    cfg["backends"]["odd"] = {"type": "odd", "how": how, "path": str(tmp_path / "odd")}
    ck = CheckpointManager.from_config(cfg, plugin_manager=zoo_pm, fallback_dir=tmp_path / "fb")
    model = _model()
    if fails:
        with pytest.raises(PublishError, match=fails) as info:
            ck.finalize(model, step=3)
        assert set(info.value.failures) == {"odd"}
    else:
        assert [r.backend for r in ck.finalize(model, step=3)] == ["odd", "archive"]
    ck.close()
    assert _same_state(_archived(tmp_path)["model"], model)


def test_the_fallback_lands_when_only_a_converted_model_was_stored(tmp_path, zoo_pm, zoo_dist, monkeypatch,
                                                                   capsys):
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "archive"
    blocker.write_text("not a folder")  # the archive cannot be created: its backend fails
    cfg = tmp_path / "ckptkit.yaml"
    cfg.write_text(json.dumps(_config(tmp_path, ["zoo", "archive"])))
    ck = CheckpointManager.from_config(str(cfg), plugin_manager=zoo_pm)
    model = _model()
    with pytest.raises(PublishError) as info:
        ck.finalize(model, step=3, metrics={"loss": 0.25})
    ck.close()
    fallback = tmp_path / "ckptkit-fallback" / "exp" / "final"
    assert set(info.value.failures) == {"archive"} and str(fallback) in str(info.value)
    assert _same_state(torch.load(fallback / FINAL, weights_only=True)["model"], model)

    # Once the archive works, `ckptkit publish` finds the model in the fallback folder.
    blocker.unlink()
    assert main(["publish", str(cfg), "--backend", "archive", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["source"]["backend"] is None and [p["backend"] for p in data["published"]] == ["archive"]
    body = _archived(tmp_path)
    assert body["step"] == 3 and body["metrics"] == {"loss": 0.25} and _same_state(body["model"], model)


def test_cli_publish_sends_the_state_to_a_converting_backend(tmp_path, zoo_pm, zoo_dist, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "ckptkit.yaml"
    cfg.write_text(json.dumps(_config(tmp_path, ["zoo", "archive"], fail=True)))
    ck = CheckpointManager.from_config(str(cfg), plugin_manager=zoo_pm)
    model = _model()
    with pytest.raises(PublishError, match="zoo"):
        ck.finalize(model, step=3)
    ck.close()

    # The zoo is back, converting to half precision; the archive already holds these bytes.
    cfg.write_text(json.dumps(_config(tmp_path, ["zoo", "archive"], dtype="float16")))
    assert main(["publish", str(cfg), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [p["backend"] for p in data["published"]] == ["zoo"] and not data["failures"]
    assert [p["backend"] for p in data["already_held"]] == ["archive"]
    assert len(ModelZoo.received) == 1 and _same_state(ModelZoo.received[0], model)
    stored = load_file(tmp_path / "zoo" / "exp" / "v3" / "model.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.float16}
    assert all(torch.equal(stored[k], v.half()) for k, v in model.state_dict().items())


def test_publishing_a_resume_step_hands_the_converting_backend_the_state_in_memory(tmp_path, zoo_pm):
    cfg = _config(tmp_path, ["zoo"])
    cfg["backends"]["scratch"] = {"type": "local", "path": str(tmp_path / "scratch")}
    cfg["roles"]["resume"] = {"backends": ["scratch"], "every_n_steps": 1, "keep_last": 1}
    ck = CheckpointManager.from_config(cfg, plugin_manager=zoo_pm)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ck.save(step=4, model=model, optimizer=opt)
    from ckptkit.publish import find_source, publish

    result = publish(ck, find_source(ck, step=4))
    ck.close()
    assert result.ok and [r.backend for r in result.published] == ["zoo"]
    assert len(ModelZoo.received) == 1 and _same_state(ModelZoo.received[0], model)
    assert _same_state(load_file(tmp_path / "zoo" / "exp" / "v4" / "model.safetensors"), model)


def test_the_retry_command_a_failed_finalize_names_publishes_as_written(tmp_path, monkeypatch):
    """The error's ``ckptkit publish ...`` names the config, the run and the fallback folder:
    run as written once the backend is back, it publishes what finalize could not. From another
    folder too: the config given by a relative path, and the default fallback folder, relative
    to where the manager was built, were named so, and from elsewhere publish found no final
    model; a trainer that changed folder after building its manager gets the same names."""
    import shlex

    import yaml

    blocked = tmp_path / "registry"
    blocked.write_text("a file where the final backend's folder should be")
    config = tmp_path / "ck.yaml"
    config.write_text(yaml.safe_dump({
        "run_name": "exp",
        "backends": {"scratch": {"type": "local", "path": str(tmp_path / "scratch")},
                     "registry": {"type": "local", "path": str(blocked / "models")}},
        "roles": {"resume": {"backends": ["scratch"]}, "final": {"backends": ["registry"]}}}))
    monkeypatch.chdir(tmp_path)
    ck = CheckpointManager.from_config("ck.yaml", run_name="exp-42")
    model = torch.nn.Linear(3, 2)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # a trainer that changes folder after building its manager
    with pytest.raises(PublishError) as caught:
        ck.finalize(model=model, step=7)
    ck.close()
    command = str(caught.value).split("retry with: ", 1)[1].split("\n")[0]
    words = shlex.split(command)
    assert words[:3] == ["ckptkit", "publish", str(config)] and "exp-42" in words
    assert words[words.index("--fallback-dir") + 1] == str(tmp_path / "ckptkit-fallback")
    blocked.unlink()
    assert main(words[1:]) == 0
    stored = torch.load(tmp_path / "registry/models/exp-42/final/final_model.pt", weights_only=True)
    assert torch.equal(stored["model"]["weight"], model.weight) and stored["step"] == 7


def _kept_config(tmp_path, keep_last=3, resume_type="local"):
    return {"run_name": "exp",
            "backends": {"scratch": {"type": resume_type, "path": str(tmp_path / "scratch")},
                         "kept": {"type": "local", "path": str(tmp_path / "kept")}},
            "roles": {"resume": {"backends": ["scratch"], "every_n_steps": 5, "keep_last": keep_last},
                      "final": {"backends": ["kept"]}}}


def _run_name_used_again(tmp_path, cfg, model, old_step: int) -> None:
    """A training that published its final model of ``old_step``, its resume checkpoints then
    deleted with ``ckptkit prune --all`` (which keeps final models), and a new training under the
    same run name that saved step 10 and was stopped inside its finalize."""
    import yaml

    with CheckpointManager.from_config(cfg) as old:
        old.save(step=old_step, model=model)
        old.finalize(model=model, step=old_step)
    (tmp_path / "ck.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["prune", str(tmp_path / "ck.yaml"), "--all"]) == 0
    with CheckpointManager.from_config(cfg) as new:
        new.save(step=10, model=model)


def test_final_held_counts_only_the_final_models_of_the_training_asking(tmp_path):
    """A run name used again after ``ckptkit prune --all`` (which keeps the final models): the
    new training, stopped inside its finalize and restarted finished at step 10, took the old
    training's final model of step 20 for its own, so that its own was never published."""
    cfg = _kept_config(tmp_path)
    model = torch.nn.Linear(3, 2)
    _run_name_used_again(tmp_path, cfg, model, old_step=20)
    with CheckpointManager.from_config(cfg) as restarted:
        assert restarted.restore(model=model).step == 10
        assert restarted.final_held(10) is False
        restarted.finalize(model=model, step=10)
        assert restarted.final_held(10) is True
    with CheckpointManager.from_config(cfg) as again:
        assert again.restore(model=model).step == 10
        assert again.final_held(10) is True, "its own final model, published by the restart before"
    ids = {json.loads(p.read_text())["training_id"] for p in (tmp_path / "kept" / "exp").glob("final*/manifest.json")}
    assert len(ids) == 2 and None not in ids


@pytest.mark.parametrize("how", ["restored", "resumed by the trainer", "written before training ids"])
def test_a_training_restarted_finished_publishes_its_final_model_once(tmp_path, how):
    """Restarted again and again after a stop inside finalize, a training publishes once: also
    one whose trainer resumed it by its own means (the Trainer's resume_from_checkpoint, no
    restore), and one whose checkpoint a ckptkit before training ids wrote."""
    from ckpt_helpers import rewrite_manifest

    cfg = _kept_config(tmp_path)
    model = torch.nn.Linear(3, 2)
    with CheckpointManager.from_config(cfg) as first:
        first.save(step=10, model=model)  # then stopped inside finalize
    if how == "written before training ids":
        rewrite_manifest(tmp_path / "scratch/exp/step-0000000010", training_id=None)
    answers = []
    for _ in range(3):
        with CheckpointManager.from_config(cfg) as ck:
            if how != "resumed by the trainer":
                assert ck.restore(model=model).step == 10
            answers.append(ck.final_held(10))
            if not answers[-1]:
                ck.finalize(model=model, step=10)
    assert answers == [False, True, True]
    assert sorted(p.name for p in (tmp_path / "kept" / "exp").iterdir()) == ["final"]


def test_a_trainer_resumed_by_its_own_means_finds_its_final_model_though_that_steps_checkpoint_was_pruned(tmp_path):
    """load_best_model_at_end: the final model is of the best step, whose resume checkpoint
    keep_last pruned; a Trainer resuming by its own means (no restore) asked with an id of its
    own at every start, and published again each time."""
    cfg = _kept_config(tmp_path, keep_last=1)
    model = torch.nn.Linear(3, 2)
    with CheckpointManager.from_config(cfg) as first:
        first.save(step=5, model=model)
        first.save(step=10, model=model)
        first.finalize(model=model, step=5)
    for _ in range(2):
        with CheckpointManager.from_config(cfg) as ck:
            assert ck.final_held(5) is True


def test_final_held_cannot_tell_while_the_resume_store_does_not_answer(tmp_path, pm):
    """Which training a Trainer resumed by its own means is told by the run's checkpoints: with
    their store down, final_held answered False (publish again), not None."""
    from ckpt_helpers import DownBackend, DownFS

    pm.add_backend_type("flaky", DownBackend)
    model = torch.nn.Linear(3, 2)
    DownFS.down = False
    try:
        with CheckpointManager.from_config(_kept_config(tmp_path, resume_type="flaky"), plugin_manager=pm) as first:
            first.save(step=10, model=model)
            first.finalize(model=model, step=10)
        DownFS.down = True
        with CheckpointManager.from_config(_kept_config(tmp_path, resume_type="flaky"), plugin_manager=pm) as ck:
            assert ck.final_held(10) is None
            DownFS.down = False
            assert ck.final_held(10) is True
    finally:
        DownFS.down = True


def test_another_trainings_final_model_of_the_same_bytes_is_not_handed_back_as_this_ones(tmp_path):
    """A deterministic training run again under its name after prune --all makes the same
    final file; the file backend handed back the old training's as already held, and this
    training's final_held stayed False at every restart."""
    cfg = _kept_config(tmp_path)
    model = torch.nn.Linear(3, 2)
    _run_name_used_again(tmp_path, cfg, model, old_step=10)
    answers = []
    for _ in range(3):
        with CheckpointManager.from_config(cfg) as ck:
            assert ck.restore(model=model).step == 10
            answers.append(ck.final_held(10))
            if not answers[-1]:
                ck.finalize(model=model, step=10)
    assert answers == [False, True, True]
    assert sorted(p.name for p in (tmp_path / "kept" / "exp").iterdir()) == ["final", "final-2"]


def test_with_no_resume_checkpoint_to_tell_the_training_by_every_final_model_counts(tmp_path):
    """A config with a final role alone, or a run whose resume checkpoints are gone: a manager
    that neither saved nor restored asked with an id of its own, new at every start, and
    published again each time."""
    cfg = _kept_config(tmp_path)
    del cfg["roles"]["resume"]
    model = torch.nn.Linear(3, 2)
    with CheckpointManager.from_config(cfg) as first:
        first.finalize(model=model, step=10)
    for _ in range(2):
        with CheckpointManager.from_config(cfg) as ck:
            assert ck.final_held(10) is True
    assert sorted(p.name for p in (tmp_path / "kept" / "exp").iterdir()) == ["final"]


def test_ckptkit_publish_of_a_resume_step_names_the_training_that_committed_it(tmp_path):
    """Written before training ids, the resume checkpoint names none: the final model published
    from it named none either, and counted for every later training of the run name."""
    import yaml

    from ckpt_helpers import rewrite_manifest
    from ckptkit.manifest import Manifest, training_of

    cfg = _kept_config(tmp_path)
    with CheckpointManager.from_config(cfg) as ck:
        ck.save(step=10, model=torch.nn.Linear(3, 2))
    step = tmp_path / "scratch/exp/step-0000000010"
    rewrite_manifest(step, training_id=None)
    (tmp_path / "ck.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["publish", str(tmp_path / "ck.yaml"), "--step", "10"]) == 0
    resumed = Manifest.from_json((step / "manifest.json").read_bytes())
    published = Manifest.from_json((tmp_path / "kept/exp/final/manifest.json").read_bytes())
    assert published.training_id == training_of(resumed) and published.training_id.startswith("legacy-")


def _finished_at_20(tmp_path, cfg=None):
    """A training that saved steps 5 to 20 and published its final model of step 20."""
    cfg = cfg or _kept_config(tmp_path, keep_last=5)
    model = torch.nn.Linear(3, 2)
    with CheckpointManager.from_config(cfg) as first:
        for step in (5, 10, 15, 20):
            first.save(step=step, model=model)
        first.finalize(model=model, step=20)
    return cfg, model


def _branch_off_10(tmp_path, ck, model, change: float) -> None:
    """``ck`` restores step 10 past the newer steps, which are then deleted by hand, and trains on
    differently (``change`` added to the weights) to save steps 15 and 20 again."""
    with pytest.warns(RuntimeWarning, match="newer than the restored step 10"):
        assert ck.restore(model=model, step=10).step == 10
    for step in (15, 20):
        shutil.rmtree(tmp_path / "scratch" / "exp" / f"step-{step:010d}")
    with torch.no_grad():
        model.weight.add_(change)
    for step in (15, 20):
        ck.save(step=step, model=model)


def test_a_training_rolled_back_past_its_published_final_model_publishes_its_own(tmp_path):
    """restore(step=N) past a loss spike, the newer steps deleted by hand, trained on to the same
    last step, stopped inside finalize and restarted finished: the final model the first branch
    published is not this one's, so it is published again rather than taken for held."""
    cfg, model = _finished_at_20(tmp_path)
    with CheckpointManager.from_config(cfg) as branch:
        _branch_off_10(tmp_path, branch, model, 1.0)
    with CheckpointManager.from_config(cfg) as restarted:
        assert restarted.restore(model=model).step == 20
        assert restarted.final_held(20) is False, "the first branch's final model counted as this one's"
        restarted.finalize(model=model, step=20)
        assert restarted.final_held(20) is True
    with CheckpointManager.from_config(cfg) as again:
        assert again.restore(model=model).step == 20
        assert again.final_held(20) is True
    # Restored without step= (nothing newer), a training carries its id on as before.
    with CheckpointManager.from_config(cfg) as plain:
        assert plain.restore(model=model, step=20).step == 20
        assert plain.final_held(20) is True


def _rolled_back_to_10_twice(cfg, model) -> list[bool | None]:
    """Two jobs in turn that restore step 10 past newer steps and publish its model unless
    final_held says it is published: what final_held said to each."""
    held = []
    for _ in range(2):
        with CheckpointManager.from_config(cfg) as branch:
            with pytest.warns(RuntimeWarning, match="newer than the restored step 10"):
                assert branch.restore(model=model, step=10).step == 10
            held.append(branch.final_held(10))
            if not held[-1]:
                branch.finalize(model=model, step=10)
    return held


def test_the_same_rollback_run_again_publishes_its_final_model_once(tmp_path):
    """restore(step=10) past newer steps, then finalize(step=10) to publish the model before a
    loss spike, run twice (a requeued job): a branch id drawn at random made each run another
    training, whose final model was published again (review)."""
    cfg, model = _finished_at_20(tmp_path)
    assert _rolled_back_to_10_twice(cfg, model) == [False, True]
    assert sorted(p.name for p in (tmp_path / "kept" / "exp").iterdir()) == ["final", "final-2"]


def test_a_second_branch_off_the_same_step_is_another_training(tmp_path):
    """Two rollbacks to step 10, one after the other, each past the newer steps there were: the
    second branch took the first one's training id (made from the step alone), so the first
    branch's final model counted as the second's at its finished restart (review)."""
    cfg, model = _finished_at_20(tmp_path)
    for branch in (1, 2):
        with CheckpointManager.from_config(cfg) as ck:
            _branch_off_10(tmp_path, ck, model, branch)
            if branch == 1:
                ck.finalize(model=model, step=20)  # the second branch is stopped inside its finalize
    with CheckpointManager.from_config(cfg) as restarted:
        assert restarted.restore(model=model).step == 20
        assert restarted.final_held(20) is False, "the first branch's final model counted as the second's"


def test_a_rollback_run_again_is_the_same_branch_though_one_copy_of_the_newest_step_is_damaged(tmp_path):
    """The branch id is made from the training that committed the newest step: with the first
    backend's copy of it damaged, the id was drawn at random, and a job run again published its
    final model again, though the other backend's copy told the training (review)."""
    cfg = _kept_config(tmp_path, keep_last=5)
    cfg["backends"]["mirror"] = {"type": "local", "path": str(tmp_path / "mirror")}
    cfg["roles"]["resume"]["backends"] = ["scratch", "mirror"]
    cfg, model = _finished_at_20(tmp_path, cfg)
    manifest = tmp_path / "scratch" / "exp" / "step-0000000020" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:-20])
    assert _rolled_back_to_10_twice(cfg, model) == [False, True]
