import sys
import textwrap

import pytest

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
        ("import not_a_real_module_xyz\n", "failed to load"),
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


def test_duplicate_type_name_names_both_distributions(tmp_path, monkeypatch):
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
    _write_dist(site, "ckptkit-dupe", "dupe_backend", body, entry="local")
    monkeypatch.syspath_prepend(str(site))
    pm = make_plugin_manager(autoload=True)
    cfg = {"backends": {"d": {"type": "local", "path": "x"}}, "roles": {"resume": {"backends": ["d"]}}}
    with pytest.raises(PluginError, match=r"'local'.*ckptkit-dupe 0.3.*clashes.*ckptkit 0"):
        CheckpointManager.from_config(cfg, plugin_manager=pm)
    sys.modules.pop("dupe_backend", None)


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
