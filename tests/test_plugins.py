import inspect
import json
import re
import sys
import textwrap

import pytest
import torch
import yaml

import ckptkit
from ckptkit import CheckpointManager, ConfigError, PluginError
from ckptkit._project import BACKENDS_ENTRY_POINT_GROUP, DISABLE_AUTOLOAD_ENV, PROJECT_NAME
from ckptkit.local import LocalBackend
from ckptkit.plugins import make_plugin_manager
from ckptkit.roles import Role


def test_one_name_for_markers_manager_and_group():
    assert ckptkit.hookimpl.project_name == PROJECT_NAME
    assert make_plugin_manager(autoload=False).project_name == PROJECT_NAME
    assert BACKENDS_ENTRY_POINT_GROUP == f"{PROJECT_NAME}.backends"


def test_local_comes_from_ckptkits_own_entry_point(pm):
    local = pm.backend_types["local"]
    assert local.cls is LocalBackend
    assert local.dist.startswith("ckptkit ")
    assert set(local.roles) == {Role.RESUME, Role.FINAL}


def test_third_party_distribution_is_discovered(third_party_dist):
    pm = make_plugin_manager(autoload=True)
    memo = pm.backend_types["memo"]
    assert memo.dist == "ckptkit-memo 1.2"
    assert memo.cls.__module__ == "ckptkit_memo"
    assert set(memo.roles) == {Role.RESUME, Role.FINAL}


@pytest.mark.parametrize("spelled", ["ckptkit-memo", "ckptkit_memo", "CKPTKIT.Memo"])
def test_one_distribution_is_loaded_by_its_name_however_spelled(third_party_dist, spelled):
    pm = make_plugin_manager(autoload=False)
    pm.load_backend_entrypoints(only_dist=spelled)
    assert "memo" in pm.backend_types and "local" in pm.backend_types


@pytest.mark.parametrize("value, loaded", [("1", False), ("true", False), ("0", True), ("", True)])
def test_autoload_can_be_switched_off(third_party_dist, monkeypatch, value, loaded):
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, value)
    pm = make_plugin_manager()
    assert ("memo" in pm.backend_types) is loaded
    assert "local" in pm.backend_types


def test_third_party_backend_is_called_only_for_its_role(third_party_dist, tmp_path):
    from ckpt_helpers import make_model, train_step

    cfg = {
        "backends": {"scratch": {"type": "local", "path": str(tmp_path / "s")}, "memo": {"type": "memo"}},
        "roles": {"resume": {"backends": ["scratch"], "every_n_steps": 2, "keep_last": 2},
                  "final": {"backends": ["memo"]}},
    }
    memo = sys.modules.get("ckptkit_memo")
    ck = CheckpointManager.from_config(cfg, run_name="r", plugin_manager=make_plugin_manager(autoload=True))
    memo = sys.modules["ckptkit_memo"]
    model, opt = make_model()
    for step in range(6):
        train_step(model, opt)
        ck.save(step=step, model=model, optimizer=opt)
    ck.restore(model, opt)
    refs = ck.finalize(model, step=5, metrics={"loss": 0.5})
    ck.close()
    hooks = [c[1] for c in memo.CALLS]
    assert hooks == ["publish_final"], "memo must see only the final role's hook"
    assert refs[0].uri == "memo://memo/r/final"
    files, manifest = memo.STORE[("memo", "r", "final")]
    assert manifest.role == "final" and manifest.step == 5 and manifest.metrics == {"loss": 0.5}
    assert set(files) == {"final_model.pt"}
    assert not (tmp_path / "s" / "r" / "final").exists(), "the final model must not land in the resume backend"


def _write_dist(site, dist_name, module, body, entry="thing"):
    (site / f"{module}.py").write_text(textwrap.dedent(body))
    info = site / f"{dist_name.replace('-', '_')}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[ckptkit.backends]\n{entry} = {module}:Backend\n")


@pytest.mark.parametrize(
    "body, message",
    [
        ("import not_a_real_module_xyz\n", "failed to load: importing bad_backend_"),
        ("x = 1\ny = undefined_name\n", ".py:2: name 'undefined_name' is not defined"),  # where, from a CLI
        # The plugin's own line, not the standard library's where the failure surfaced.
        ("import os\nregion = os.environ['CKPTKIT_TEST_NO_SUCH_VARIABLE']\n",
         ".py:2: 'CKPTKIT_TEST_NO_SUCH_VARIABLE'"),
        ("import json\nsettings = json.loads('{')\n", ".py:2: Expecting property name"),
        ("x = 1\ndef broken(:\n", ".py:2: invalid syntax"),
        ("""
            import ckptkit
            class Backend:
                @classmethod
                def from_config(cls, name, options): return cls()
                @ckptkit.hookimpl
                def save_resume(self, run_name, step, payload, surprise): pass
         """, "hook save_resume takes surprise"),
        ("""
            import ckptkit
            class Backend:
                @classmethod
                def from_config(cls, name, options): return cls()
                @ckptkit.hookimpl
                def save_everything(self): pass
         """, "save_everything is marked as a hook but ckptkit has no such hook"),
        ("""
            class Backend:
                @classmethod
                def from_config(cls, name, options): return cls()
         """, "implements no ckptkit hook"),
    ],
)
def test_bad_plugin_error_names_plugin_and_distribution(tmp_path, monkeypatch, body, message):
    site = tmp_path / "site"
    site.mkdir()
    module = f"bad_backend_{abs(hash(message))}"
    _write_dist(site, "ckptkit-bad", module, body)
    monkeypatch.syspath_prepend(str(site))
    pm = make_plugin_manager(autoload=True)
    assert "thing" not in pm.backend_types and "local" in pm.backend_types
    cfg = {"backends": {"t": {"type": "thing"}}, "roles": {"final": {"backends": ["t"]}}}
    with pytest.raises(PluginError) as info:
        CheckpointManager.from_config(cfg, plugin_manager=pm)
    text = str(info.value)
    assert text.startswith("backends.t.type: ")
    assert "'thing'" in text and "ckptkit-bad 0.3" in text and message in text
    # A config that does not use the broken type is not affected.
    ok = {"backends": {"d": {"type": "local", "path": str(tmp_path / "d")}}, "roles": {"resume": {"backends": ["d"]}}}
    CheckpointManager.from_config(ok, plugin_manager=pm).close()
    sys.modules.pop(module, None)


def test_duplicate_type_name_names_both_distributions(tmp_path, monkeypatch, capsys):
    site = tmp_path / "site"
    site.mkdir()
    body = """
        import ckptkit
        class Backend:
            @classmethod
            def from_config(cls, name, options): return cls()
            @ckptkit.hookimpl
            def publish_final(self, run_name, payload): pass
    """
    _write_dist(site, "ckptkit-dupe", "dupe_backend", body, entry="dupe")
    _write_dist(site, "ckptkit-dupe2", "dupe_backend2", body, entry="dupe")
    monkeypatch.syspath_prepend(str(site))
    pm = make_plugin_manager(autoload=True)
    cfg = {"backends": {"d": {"type": "dupe", "path": "x"}}, "roles": {"final": {"backends": ["d"]}}}
    with pytest.raises(PluginError, match=r"'dupe'.*ckptkit-dupe2? 0.3.*clashes.*ckptkit-dupe2? 0.3"):
        CheckpointManager.from_config(cfg, plugin_manager=pm)
    # ckptkit backends listed it twice, once as working, which no config could use.
    from ckptkit.cli import main

    capsys.readouterr()
    assert main(["backends", "--json"]) == 0
    listed = [row for row in json.loads(capsys.readouterr().out) if row["type"] == "dupe"]
    assert len(listed) == 1 and "clashes" in listed[0]["error"], listed
    assert listed[0]["distribution"] in ("ckptkit-dupe 0.3", "ckptkit-dupe2 0.3"), listed
    sys.modules.pop("dupe_backend", None)
    sys.modules.pop("dupe_backend2", None)


def test_a_distribution_claiming_a_builtin_type_is_ignored_and_named(tmp_path, monkeypatch, caplog):
    """A plugin declaring type 'local' made every config using the built-in fail, with advice to
    uninstall one of the two distributions, ckptkit among them."""
    site = tmp_path / "site"
    site.mkdir()
    _write_dist(site, "ckptkit-hijack", "hijack_backend", "raise RuntimeError('must not be imported')\n",
                entry="local")
    monkeypatch.syspath_prepend(str(site))
    with caplog.at_level("WARNING", logger="ckptkit.plugins"):
        pm = make_plugin_manager(autoload=True)
    assert "ckptkit-hijack 0.3 declares backend type 'local', which ckptkit itself provides" in caplog.text
    assert "hijack_backend" not in sys.modules
    cfg = {"backends": {"d": {"type": "local", "path": str(tmp_path / "ck")}}, "roles": {"resume": {"backends": ["d"]}}}
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        assert type(ck.router.instances["d"]) is ckptkit.local.LocalBackend


def test_type_without_a_roles_hooks_is_a_config_error(pm, tmp_path):
    class FinalOnly:
        ROLE_HINTS = {"resume": "finals only here"}

        @classmethod
        def from_config(cls, name, options):
            return cls()

        @ckptkit.hookimpl
        def publish_final(self, run_name, payload):
            return None

    pm.add_backend_type("finalonly", FinalOnly)
    cfg = {"backends": {"f": {"type": "finalonly"}},
           "roles": {"resume": {"backends": ["f"]}, "final": {"backends": ["f"]}}}
    with pytest.raises(ConfigError) as info:
        CheckpointManager.from_config(cfg, plugin_manager=pm)
    text = str(info.value)
    assert text.startswith("roles.resume.backends: backend 'f' has type 'finalonly'")
    assert "save_resume" in text and "finals only here" in text and "serves: final" in text


def test_type_that_serves_no_role_is_told_so_not_to_move_the_backend(pm, tmp_path):
    class Nothing:
        @classmethod
        def from_config(cls, name, options):
            return cls()

        @ckptkit.hookimpl
        def open_file(self, ref, name):
            return None

    pm.add_backend_type("nothing", Nothing)
    cfg = {"backends": {"n": {"type": "nothing"}}, "roles": {"resume": {"backends": ["n"]}}}
    with pytest.raises(ConfigError) as info:
        CheckpointManager.from_config(cfg, plugin_manager=pm)
    text = str(info.value)
    assert "it does not implement save_resume, list_checkpoints, read_manifest, prune" in text
    assert "That type serves no role" in text and "declare" not in text


def test_a_listing_that_raises_a_bug_names_the_backend_and_is_never_taken_for_an_empty_run(pm, tmp_path):

    class Buggy(LocalBackend):
        @ckptkit.hookimpl
        def list_checkpoints(self, run_name):
            raise KeyError("boom in list_checkpoints")

    pm.add_backend_type("buggy", Buggy)
    cfg = {"backends": {"flat": {"type": "buggy", "path": str(tmp_path / "b")}},
           "roles": {"resume": {"backends": ["flat"]}}}
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        model = torch.nn.Linear(2, 2)
        with pytest.raises(ckptkit.BackendError) as info:
            ck.restore(model)
    assert str(info.value).startswith("backend 'flat': listing run 'default' raised KeyError: 'boom in list_checkpoints'")
    assert "type 'buggy'" in str(info.value) and isinstance(info.value.__cause__, KeyError)


def test_instances_are_registered_under_their_config_names(pm, tmp_path):
    cfg = {"backends": {"a": {"type": "local", "path": str(tmp_path / "a")},
                        "b": {"type": "local", "path": str(tmp_path / "b")},
                        "unused": {"type": "local", "path": str(tmp_path / "u")}},
           "roles": {"resume": {"backends": ["a", "b"]}}}
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    assert isinstance(pm.get_plugin("a"), LocalBackend) and pm.get_plugin("a").root == str(tmp_path / "a")
    assert pm.get_plugin("unused") is None
    ck.close()
    assert pm.get_plugin("a") is None, "close unregisters the backends"


def _hook_defaults(cls) -> list[str]:
    """``Class.hook(arg)`` for every argument of a ckptkit hook implementation that has a default."""
    found = []
    for attr in dir(cls):
        if getattr(getattr(cls, attr, None), f"{PROJECT_NAME}_impl", None) is None:
            continue
        for p in inspect.signature(getattr(cls, attr)).parameters.values():
            if p.default is not p.empty:
                found.append(f"{cls.__name__}.{attr}({p.name})")
    return found


def test_every_shipped_backend_gets_every_hook_argument_from_any_pluggy():
    # pluggy < 1.7 never passes an argument that the implementation gives a default, so a
    # defaulted dry_run in prune was always False there: shipped types must not have one.
    pm = make_plugin_manager(autoload=True)
    shipped = {"local", "s3", "gcs", "mlflow"}
    assert not shipped & set(pm.broken), {n: str(e) for n, e in pm.broken.items()}
    assert shipped <= set(pm.backend_types)
    assert [d for n in sorted(shipped) for d in _hook_defaults(pm.backend_types[n].cls)] == []


def test_hook_argument_with_a_default_is_refused_when_the_type_is_added(pm):
    class Lenient:
        @classmethod
        def from_config(cls, name, options):
            return cls()

        @ckptkit.hookimpl
        def list_checkpoints(self, run_name):
            return []

        @ckptkit.hookimpl
        def prune(self, run_name, keep_last, protected_steps, dry_run=False):
            return []

    with pytest.raises(PluginError) as info:
        pm.add_backend_type("lenient", Lenient, "ckptkit-lenient 0.2")
    text = str(info.value)
    assert "'lenient'" in text and "Lenient" in text and "ckptkit-lenient 0.2" in text
    assert "hook prune" in text and "dry_run" in text
    assert "pluggy" in text and "1.7" in text and "default" in text
    assert "lenient" not in pm.backend_types


@pytest.mark.parametrize("hook, signature, missing", [
    ("prune", "self, run_name, keep_last, protected_steps", "dry_run"),
    ("prune", "self, run_name, keep_last, dry_run", "protected_steps"),
    ("prune", "self, run_name, keep_last", "dry_run, protected_steps"),
    ("delete_run", "self, run_name", "dry_run"),
])
def test_a_deleting_hook_that_leaves_out_what_protects_is_refused_when_the_type_is_added(pm, hook, signature,
                                                                                         missing):
    """A prune that took a subset of its arguments without dry_run loaded, and `ckptkit prune
    --dry-run` deleted the checkpoints it said it would only list."""
    namespace = {}
    exec(f"def {hook}({signature}): return []", namespace)
    Careless = type("Careless", (), {"from_config": classmethod(lambda cls, name, options: cls()),
                                     hook: ckptkit.hookimpl(namespace[hook])})
    with pytest.raises(PluginError) as info:
        pm.add_backend_type("careless", Careless, "ckptkit-careless 0.1")
    text = str(info.value)
    assert "'careless'" in text and "ckptkit-careless 0.1" in text
    assert f"hook {hook} does not take {missing}" in text and "delete" in text
    assert "careless" not in pm.backend_types


@pytest.mark.parametrize("signature", ["self, run_name, *, keep_last, protected_steps, dry_run",
                                       "self, run_name, keep_last, **options"])
def test_hook_arguments_that_pluggy_never_passes_are_refused(pm, signature):
    namespace = {}
    exec(f"def prune({signature}): return []", namespace)
    Odd = type("Odd", (), {"from_config": classmethod(lambda cls, name, options: cls()),
                           "prune": ckptkit.hookimpl(namespace["prune"])})
    with pytest.raises(PluginError, match=r"'odd'.*hook prune.*pluggy never passes"):
        pm.add_backend_type("odd", Odd)


def test_prune_dry_run_from_the_cli_deletes_nothing(tmp_path, capsys):
    import yaml

    from ckpt_helpers import local_config, make_model, train_step
    from ckptkit.cli import main

    cfg = local_config(tmp_path, keep=10, final=False)
    config = tmp_path / "ckptkit.yaml"
    config.write_text(yaml.safe_dump(cfg))
    pm = make_plugin_manager(autoload=False)
    model, opt = make_model()
    with CheckpointManager.from_config(str(config), plugin_manager=pm) as ck:
        # What pluggy built for the registered backend: an argument it holds as a "keyword
        # with a default" is one that pluggy < 1.7 never passes.
        assert [(impl.plugin_name, impl.kwargnames) for impl in pm.hook.prune.get_hookimpls()
                if impl.kwargnames] == []
        for step in range(4):
            train_step(model, opt)
            ck.save(step=step, epoch=0, model=model, optimizer=opt)
    run = tmp_path / "scratch" / "exp"
    before = sorted(p.name for p in run.iterdir())
    assert len(before) == 4

    assert main(["prune", str(config), "--keep-last", "1", "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] is True and sorted(r["step"] for r in report["deleted"]) == [0, 1, 2]
    assert sorted(p.name for p in run.iterdir()) == before, "--dry-run deleted checkpoints"
    assert main(["verify", str(config), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4


def test_registering_a_backend_runs_none_of_its_properties():
    """pluggy reads every attribute of a plugin to find its hooks: a backend's lazily made
    client must not be made then (an MLflow client connects, and may create mlflow.db)."""
    import functools

    from ckptkit.plugins import BackendType, make_plugin_manager

    made = []

    class Lazy:
        @property
        def client(self):
            made.append("client")
            return object()

        @functools.cached_property
        def session(self):
            made.append("session")
            return object()

        @ckptkit.hookimpl
        def close(self):
            pass

    pm = make_plugin_manager(autoload=False)
    pm.register_backend(Lazy(), "lazy", BackendType(name="lazy", cls=Lazy, dist="tests", hooks=frozenset({"close"})))
    assert made == []
    assert pm.get_plugin("lazy") is not None and len(pm.hook.close.get_hookimpls()) >= 1


def test_a_manager_that_fails_to_register_its_backends_leaves_a_shared_plugin_manager_as_it_was(tmp_path):
    """A sweep shares one plugin manager between trials: a trial whose manager failed half way
    (here its second backend's name is taken) must not leave its first backend registered, or
    every later trial fails on that name."""
    pm = make_plugin_manager(autoload=False)
    cfg = {"backends": {"a": {"type": "local", "path": str(tmp_path / "a")},
                        "b": {"type": "local", "path": str(tmp_path / "b")}},
           "roles": {"resume": {"backends": ["a", "b"], "every_n_steps": 1, "keep_last": 2}}}
    squatter = object()
    pm.register(squatter, name="b")
    before = dict(pm.list_name_plugin())
    with pytest.raises(PluginError, match="backend 'b'.*could not be registered"):
        CheckpointManager.from_config(cfg, run_name="r", plugin_manager=pm)
    assert dict(pm.list_name_plugin()) == before
    pm.unregister(squatter)
    before = dict(pm.list_name_plugin())
    with pytest.raises(ValueError, match="on_error"):  # refused after its backends were registered
        CheckpointManager.from_config(cfg, run_name="r", plugin_manager=pm, on_error="ignore")
    assert dict(pm.list_name_plugin()) == before
    CheckpointManager.from_config(cfg, run_name="r", plugin_manager=pm).close()


def test_a_second_open_manager_on_a_shared_plugin_manager_is_told_what_to_do(tmp_path):
    """Two managers open at once on one plugin manager, with a backend of one name: pluggy's
    "Plugin name already registered" said nothing of what to do."""
    pm = make_plugin_manager(autoload=False)
    cfg = {"backends": {"a": {"type": "local", "path": str(tmp_path / "a")}},
           "roles": {"resume": {"backends": ["a"], "every_n_steps": 1, "keep_last": 2}}}
    first = CheckpointManager.from_config(cfg, run_name="one", plugin_manager=pm)
    with pytest.raises(PluginError) as info:
        CheckpointManager.from_config(cfg, run_name="two", plugin_manager=pm)
    assert str(info.value).startswith("backend 'a': this plugin manager serves a CheckpointManager with a backend of "
                                      "that name already, one that is still open. Close that manager first"), info.value
    first.save(step=0, model=torch.nn.Linear(2, 2))  # the first one is as it was
    first.close()
    CheckpointManager.from_config(cfg, run_name="two", plugin_manager=pm).close()


def test_a_closed_manager_still_referenced_keeps_no_backend(tmp_path):
    """A sweep keeps its trials' managers in a list of results: a closed one lets its backends
    and their clients go (an S3 client holds about 13 MB of service models)."""
    import gc
    import weakref

    cfg = {"backends": {"a": {"type": "local", "path": str(tmp_path / "a")}},
           "roles": {"resume": {"backends": ["a"], "every_n_steps": 1, "keep_last": 2}}}
    ck = CheckpointManager.from_config(cfg, run_name="r", plugin_manager=make_plugin_manager(autoload=False))
    ck.save(step=0, model=torch.nn.Linear(2, 2))
    backend = weakref.ref(ck.router.instances["a"])
    ck.close()
    gc.collect()
    assert backend() is None
    with pytest.raises(ckptkit.CkptkitError, match="closed"):
        ck.save(step=1, model=torch.nn.Linear(2, 2))


def test_two_managers_sharing_a_plugin_manager_each_reach_their_own_backends_only(tmp_path):
    """A sweep's trials share one plugin manager: the first trial's calls, whose hook callers
    were made before the second trial registered its backend, reach the first's backend only."""
    import os

    pm = make_plugin_manager(autoload=False)

    def cfg(name):
        return {"backends": {name: {"type": "local", "path": str(tmp_path / name)}},
                "roles": {"resume": {"backends": [name], "every_n_steps": 1, "keep_last": 1}}}

    model = torch.nn.Linear(2, 2)
    first = CheckpointManager.from_config(cfg("a"), run_name="one", plugin_manager=pm)
    first.save(step=0, model=model)
    second = CheckpointManager.from_config(cfg("b"), run_name="two", plugin_manager=pm)
    second.save(step=5, model=model)
    assert [(r.backend, r.step) for r in first.list_checkpoints()] == [("a", 0)]
    first.save(step=1, model=model)
    assert os.listdir(tmp_path / "b") == ["two"], "the first trial wrote into the second's backend"
    second.close()
    first.close()


def test_a_plugins_own_exception_names_its_backend_type_and_distribution(tmp_path, monkeypatch, capsys):
    """A bug in a third-party backend is reported as its own, never as a bare traceback or an
    error that names nothing: where it happens, at build, save, probe or close."""
    from ckptkit.cli import main as cli_main

    site = tmp_path / "site"
    site.mkdir()
    _write_dist(site, "ckptkit-rowdy", "rowdy_backend", """
        import os
        import ckptkit
        from ckptkit.local import LocalBackend

        ERRORS = {"check_final": AttributeError, "tracking_run_id": LookupError, "probe": KeyError,
                  "close": RuntimeError}

        class Backend(LocalBackend):
            def _raise(self, hook):
                if hook in os.environ.get("ROWDY_FAIL", "").split(","):
                    raise ERRORS[hook](f"rowdy {hook} bug")

            @ckptkit.hookimpl
            def check_final(self, run_name, algorithm):
                self._raise("check_final")
                if "check_final_text" in os.environ.get("ROWDY_FAIL", ""):
                    return "one problem"  # read a character to a problem, were it taken
                return []

            @ckptkit.hookimpl
            def tracking_run_id(self, run_name, resumed_run_id):
                self._raise("tracking_run_id")
                return None

            @ckptkit.hookimpl
            def probe(self):
                self._raise("probe")
                return super().probe()

            @ckptkit.hookimpl
            def close(self):
                self._raise("close")
                super().close()
    """, entry="rowdy")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    cfg = {"run_name": "r", "backends": {"disk": {"type": "local", "path": str(tmp_path / "d")},
                                         "loud": {"type": "rowdy", "path": str(tmp_path / "f")}},
           "roles": {"resume": {"backends": ["disk"], "every_n_steps": 1}, "final": {"backends": ["loud"]}}}
    origin = re.escape("(type 'rowdy', from ckptkit-rowdy 0.3) raised")

    monkeypatch.setenv("ROWDY_FAIL", "check_final")
    with pytest.raises(ckptkit.BackendError, match=f"^backend 'loud': check_final {origin} AttributeError: "
                                                   "rowdy check_final bug"):
        CheckpointManager.from_config(cfg, plugin_manager=make_plugin_manager(autoload=True))

    monkeypatch.setenv("ROWDY_FAIL", "check_final_text")
    with pytest.raises(ckptkit.BackendError, match=r"^backend 'loud': check_final \(type 'rowdy', from ckptkit-rowdy "
                                                   r"0\.3\) returned str, not a list of strings"):
        CheckpointManager.from_config(cfg, plugin_manager=make_plugin_manager(autoload=True))

    monkeypatch.setenv("ROWDY_FAIL", "tracking_run_id")
    ck = CheckpointManager.from_config(cfg, plugin_manager=make_plugin_manager(autoload=True))
    with pytest.raises(ckptkit.BackendError, match=f"tracking_run_id {origin} LookupError"):
        ck.save(step=1, model=torch.nn.Linear(2, 2))
    monkeypatch.setenv("ROWDY_FAIL", "close")
    with pytest.raises(ckptkit.BackendError, match=f"^backend 'loud': close {origin} RuntimeError"):
        ck.close()

    monkeypatch.setenv("ROWDY_FAIL", "probe")
    config = tmp_path / "ck.yaml"
    config.write_text(json.dumps(cfg))
    assert cli_main(["check", str(config), "--probe", "--json"]) == 1
    out, err = capsys.readouterr()
    (route,) = [r for r in json.loads(out)["routes"] if r["backend"] == "loud"]
    assert re.search(f"probe {origin} KeyError", route["probe"]["probe"])
    assert "Traceback" not in err
    sys.modules.pop("rowdy_backend", None)


def test_loading_the_entry_points_of_a_misspelt_distribution_says_so():
    """only_dist="typo" loaded nothing without a word; the config's type then looked uninstalled."""
    pm = make_plugin_manager(autoload=False)
    with pytest.raises(PluginError, match=r"only_dist='ckptkit-webdaw'\): no installed distribution of that name "
                                          r"declares ckptkit.backends entry points \(those that do: "):
        pm.load_backend_entrypoints(only_dist="ckptkit-webdaw")


def test_from_config_returning_no_instance_is_refused_naming_the_plugin(pm, tmp_path):
    """A from_config that returned None was registered as the backend: check said the config was
    fine, and each save then failed blaming a hook that had never run."""
    class Forgetful(LocalBackend):
        @classmethod
        def from_config(cls, name, options):
            super().from_config(name, options)  # made, and not returned

    pm.add_backend_type("forgetful", Forgetful)
    cfg = {"backends": {"f": {"type": "forgetful", "path": str(tmp_path / "f")}}, "roles": {"resume": {"backends": ["f"]}}}
    with pytest.raises(PluginError, match=r"backend 'f' \(type 'forgetful'.*\): from_config returned NoneType, not an "
                                          r"instance of .*Forgetful; the backend plugin is faulty"):
        CheckpointManager.from_config(cfg, plugin_manager=pm)


def test_a_probe_that_answers_no_dict_is_named_in_check_not_a_traceback(tmp_path, monkeypatch, capsys):
    """ckptkit check --probe took every probe's answer for a dict: one that returned None ended
    in an AttributeError traceback from ckptkit's own code, naming no plugin."""
    from ckptkit.cli import main

    site = tmp_path / "site"
    site.mkdir()
    _write_dist(site, "ckptkit-terse", "terse_backend", """
        import ckptkit
        from ckptkit.local import LocalBackend
        class Backend(LocalBackend):
            @ckptkit.hookimpl
            def probe(self):
                return None
    """, entry="terse")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    cfg = tmp_path / "ckptkit.yaml"
    cfg.write_text(json.dumps({"backends": {"t": {"type": "terse", "path": str(tmp_path / "t")}},
                               "roles": {"resume": {"backends": ["t"]}}}))
    code = main(["check", str(cfg), "--probe", "--json"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    shown = json.loads(captured.out)
    probe = shown["routes"][0]["probe"]
    assert probe == {"probe": "backend 't': probe (type 'terse', from ckptkit-terse 0.3) returned NoneType, not a dict "
                              "of what was checked to what was found; the backend plugin is faulty: report it to its "
                              "authors"}, probe
    assert shown["problems"] == ["the probe of t failed in the backend's plugin itself, as the table shows: report "
                                 "it to the plugin's authors"], shown["problems"]  # not the storage's credentials
    assert code == 1


def test_a_run_conflict_names_the_backend_that_listed_the_newer_step(pm, tmp_path):
    """A plugin that listed a step it never committed made a new training refuse to start,
    blaming "another training", with nothing naming the plugin whose listing it came from."""
    from ckptkit import RunConflictError
    from ckptkit.checkpoint import CheckpointRef

    class Phantom(LocalBackend):
        @ckptkit.hookimpl
        def list_checkpoints(self, run_name):
            ghost = CheckpointRef(backend=self.name, run_name=run_name, step=5, path=f"{self.root}/ghost",
                                  uri=f"file://{self.root}/ghost")
            return [*super().list_checkpoints(run_name=run_name), ghost]

    pm.add_backend_type("phantom", Phantom)
    cfg = {"run_name": "r", "backends": {"ghostly": {"type": "phantom", "path": str(tmp_path / "g")}},
           "roles": {"resume": {"backends": ["ghostly"], "every_n_steps": 1}}}
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        with pytest.raises(RunConflictError, match=r"up to step 5, .* Step 5 is listed by backend 'ghostly' "
                                                   r"\(type 'phantom', from "):
            ck.save(step=1, model=torch.nn.Linear(2, 2))


def test_a_backend_that_cannot_be_built_is_named_by_file_and_key(pm, tmp_path):
    """A client failing as it is made (gcsfs without credentials) was told without the config
    file or key, where every other config error names both."""
    class NoCredentials(LocalBackend):
        @classmethod
        def from_config(cls, name, options):
            raise RuntimeError("no credentials found")

    pm.add_backend_type("nocreds", NoCredentials)
    path = tmp_path / "ckptkit.yaml"
    path.write_text(yaml.safe_dump({"backends": {"archive": {"type": "nocreds", "path": str(tmp_path / "a")}},
                                    "roles": {"resume": {"backends": ["archive"]}}}))
    with pytest.raises(PluginError, match=rf"^{re.escape(str(path))}: backends\.archive: backend 'archive' \(type "
                                          r"'nocreds'.*could not be built from its config: RuntimeError: no credentials"):
        CheckpointManager.from_config(str(path), plugin_manager=pm)
