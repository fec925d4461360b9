"""The conformance suite of final backends that keep no files (``ckptkit.testing.FinalBackendTests``),
run against a registry defined here, which keeps an index of versions in a JSON file, and shown to
fail the registries that break the contract."""

from __future__ import annotations

import json
import os

import pytest

import ckptkit
from ckptkit import CheckpointManager
from ckptkit.plugin import make_plugin_manager
from ckptkit.plugin import CheckpointRef, HashingWriter, counts_for
from ckptkit.testing import FinalBackendTests


class JsonRegistry:
    """Versions of each run's final model in ``<folder>/index.json``, each file copied beside it."""

    def __init__(self, name: str, folder: str):
        self.name, self.folder = name, folder
        os.makedirs(folder, exist_ok=True)

    @classmethod
    def from_config(cls, name, options):
        return cls(name, options["path"])

    def _index(self) -> list[dict]:
        try:
            with open(os.path.join(self.folder, "index.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return []

    def _ref(self, run_name: str, version: dict) -> CheckpointRef:
        uri = f"jsonreg://{self.name}/{run_name}/{version['n']}"
        return CheckpointRef(backend=self.name, run_name=run_name, step=version["step"], path=uri, uri=uri,
                             role="final")

    def _where(self, n: int) -> str:
        return os.path.join(self.folder, f"v{n}.pt")

    @ckptkit.hookimpl(trylast=True)
    def publish_final(self, run_name, payload, stored):
        index = self._index()
        n = len(index) + 1
        with open(self._where(n), "wb") as f:
            # Hashed as it is written: from finalize the file is written here first (no expected).
            sink = HashingWriter(f)
            payload.files[0].write_to(sink)
        version = {"run": run_name, "n": n, "step": payload.step, "digest": sink.digest(),
                   "training": payload.training_id}
        index.append(version)
        with open(os.path.join(self.folder, "index.json"), "w") as f:
            json.dump(index, f)
        return self._ref(run_name, version)

    @ckptkit.hookimpl
    def find_published(self, run_name, digest):
        held = [v for v in self._index() if v["run"] == run_name and v["digest"] == digest]
        return self._ref(run_name, held[0]) if held else None

    @ckptkit.hookimpl
    def final_step(self, run_name, algorithm, training_id):
        return max((v["step"] for v in self._index() if v["run"] == run_name
                    and counts_for(v.get("training"), training_id)), default=None)

    @ckptkit.hookimpl
    def check_final(self, run_name, algorithm):
        return [] if os.access(self.folder, os.W_OK) else [f"{self.folder} is not writable"]


class TestJsonRegistry(FinalBackendTests):
    @pytest.fixture
    def backend(self, tmp_path):
        return JsonRegistry("reg", str(tmp_path / "registry"))


class _CannotTell(JsonRegistry):
    """A registry that cannot say which steps it holds (no final_step)."""

    final_step = None


class _OneSlot(JsonRegistry):
    """Keeps one version per run, replacing it: the earlier version's reference now holds the later bytes."""

    @ckptkit.hookimpl(trylast=True)
    def publish_final(self, run_name, payload, stored):
        with open(os.path.join(self.folder, "index.json"), "w") as f:
            json.dump([], f)
        return super().publish_final(run_name=run_name, payload=payload, stored=stored)


class _HandsOnStored(JsonRegistry):
    """Answers with the ref of the copy it was handed, not its own."""

    @ckptkit.hookimpl(trylast=True)
    def publish_final(self, run_name, payload, stored):
        ref = super().publish_final(run_name=run_name, payload=payload, stored=stored)
        return stored[0] if stored else ref


class _AnyDigest(JsonRegistry):
    """Answers find_published with the run's newest version, whatever the checksum."""

    @ckptkit.hookimpl
    def find_published(self, run_name, digest):
        held = [v for v in self._index() if v["run"] == run_name]
        return self._ref(run_name, held[-1]) if held else None


@pytest.mark.parametrize("broken, test, kwargs", [
    (_OneSlot, "test_a_later_model_leaves_what_an_earlier_one_is_published_as", {}),
    (_HandsOnStored, "test_the_ref_is_this_backends_own_though_another_backend_holds_the_model", {}),
    (_AnyDigest, "test_find_published_finds_a_model_by_its_checksum_and_nothing_else", {"known": False}),
])
def test_the_suite_fails_a_registry_that_breaks_the_contract(tmp_path, broken, test, kwargs):
    suite = FinalBackendTests()
    with pytest.raises(AssertionError):
        getattr(suite, test)(broken("reg", str(tmp_path / "broken")), **kwargs)
    getattr(suite, test)(JsonRegistry("reg", str(tmp_path / "good")), **kwargs)


def test_the_registry_the_suite_passes_serves_a_training(tmp_path):
    """What the suite passes is what finalize and publish use: published once, then found held."""
    import torch

    pm = make_plugin_manager(autoload=False)
    pm.add_backend_type("jsonreg", JsonRegistry)
    cfg = {"run_name": "exp",
           "backends": {"disk": {"type": "local", "path": str(tmp_path / "ckpts")},
                        "reg": {"type": "jsonreg", "path": str(tmp_path / "registry")}},
           "roles": {"resume": {"backends": ["disk"], "every_n_steps": 1}, "final": {"backends": ["reg"]}}}
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm, fallback_dir=tmp_path / "fallback")
    model = torch.nn.Linear(4, 2)
    ck.save(step=1, model=model)
    (ref,) = ck.finalize(model=model, step=1)
    assert ref.uri == "jsonreg://reg/exp/1"
    from ckptkit.publish import find_source, publish

    result = publish(ck, find_source(ck, step=1))
    assert result.already_held == () and [r.uri for r in result.published] == ["jsonreg://reg/exp/2"]
    assert [r.uri for r in publish(ck, find_source(ck, step=1)).already_held] == ["jsonreg://reg/exp/2"]
    ck.close()


def test_final_held_cannot_tell_for_a_registry_without_final_step_and_tells_beside_a_file_backend(tmp_path):
    """A training restarted finished publishes only where final_held answers False: a registry
    that cannot tell (no final_step) answers None, which publishing would turn into a new version
    at every restart."""
    import torch

    pm = make_plugin_manager(autoload=False)
    pm.add_backend_type("jsonreg", _CannotTell)
    cfg = {"run_name": "exp",
           "backends": {"disk": {"type": "local", "path": str(tmp_path / "ckpts")},
                        "kept": {"type": "local", "path": str(tmp_path / "kept")},
                        "reg": {"type": "jsonreg", "path": str(tmp_path / "registry")}},
           "roles": {"resume": {"backends": ["disk"], "every_n_steps": 1}, "final": {"backends": ["kept"]}}}
    model = torch.nn.Linear(4, 2)
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        assert ck.final_held(3) is False
        ck.save(step=3, model=model)
        ck.finalize(model=model, step=3)
        assert (ck.final_held(3), ck.final_held(4)) == (True, False)
    cfg["roles"]["final"]["backends"] = ["kept", "reg"]
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        assert ck.final_held(3) is None
        assert ck.restore(model=model).step == 3  # the same training, restarted finished
        assert ck.final_held(3) is None
        assert ck.final_held(4) is False  # what one backend lacks is lacking, whatever the other says
