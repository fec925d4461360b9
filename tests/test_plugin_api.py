"""The public plugin API (``ckptkit.plugin``): documented, checked, and clear about authoring mistakes."""

import inspect
import os
import pathlib
import re
import shutil
import sys
import textwrap
import types

import attrs
import pytest

import ckptkit
import ckptkit.plugin as plugin
from ckptkit import CheckpointManager, ConfigError, PluginError
from ckptkit import hookspecs
from ckptkit.plugins import make_plugin_manager

DOCS = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()


def _own_doc(obj) -> str:
    """The docstring an object carries itself (a class's, not one inherited from a base)."""
    if inspect.isclass(obj):
        return (obj.__dict__.get("__doc__") or "").strip()
    if inspect.isroutine(obj) or isinstance(obj, property):
        return (obj.__doc__ or "").strip()
    if type(obj).__module__.startswith("ckptkit."):
        return _own_doc(type(obj))  # an instance of ckptkit's own class: that class documents it
    return ""  # a plain value (a str, a tuple): documented in docs/plugins.md only


def _public_methods(cls) -> dict[str, object]:
    """Methods and properties a class itself defines for callers, hook implementations left out
    (the hook's spec documents them)."""
    out = {}
    for name, raw in vars(cls).items():
        if name.startswith("_") or name.isupper():
            continue
        member = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
        if not (inspect.isfunction(member) or isinstance(member, property)):
            continue
        if getattr(member, "ckptkit_impl", None) is not None:
            continue
        out[name] = member
    return out


def undocumented(module) -> list[str]:
    """Every public name of ``module`` (and public method of its classes) without a docstring,
    and every public name that docs/plugins.md does not mention."""
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if f"`{name}" not in DOCS:
            missing.append(f"{name} (not in docs/plugins.md)")
        if (inspect.isclass(obj) or inspect.isroutine(obj) or type(obj).__module__.startswith("ckptkit.")) \
                and not _own_doc(obj):
            missing.append(name)
        if inspect.isclass(obj) and obj.__module__.startswith("ckptkit.") and not issubclass(obj, BaseException):
            missing += [f"{name}.{m}" for m, member in _public_methods(obj).items() if not _own_doc(member)]
    return missing


def test_every_public_name_has_a_docstring_and_a_place_in_the_docs():
    assert undocumented(plugin) == []


def test_the_docs_check_finds_a_missing_docstring():
    class Bare:
        def method(self):
            return 1

    fake = types.SimpleNamespace(__all__=["Bare", "hookimpl"], Bare=Bare, hookimpl=plugin.hookimpl)
    Bare.__module__ = "ckptkit.fake"
    found = undocumented(fake)
    assert "Bare" in found and "Bare.method" in found and "Bare (not in docs/plugins.md)" in found
    assert "hookimpl" not in found


def _specs() -> dict[str, object]:
    pm = make_plugin_manager(autoload=False)
    return {name: getattr(hookspecs, name) for name in dir(hookspecs)
            if pm.parse_hookspec_opts(hookspecs, name) is not None}


def test_every_hookspec_documents_each_argument_and_its_result():
    specs = _specs()
    assert {"save_resume", "publish_final", "final_ref", "find_published", "close"} <= set(specs)
    problems = []
    for name, fn in specs.items():
        doc = inspect.getdoc(fn) or ""
        if not doc:
            problems.append(f"{name}: no docstring")
            continue
        for arg in inspect.signature(fn).parameters:
            if f":param {arg}:" not in doc:
                problems.append(f"{name}: {arg} undocumented")
        if ":return:" not in doc:
            problems.append(f"{name}: result undocumented")
        if f"`{name}" not in DOCS:
            problems.append(f"{name}: not in docs/plugins.md")
    assert problems == []


def test_every_backend_attribute_is_documented():
    names = [a.name for a in plugin.BACKEND_ATTRIBUTES]
    assert {"ROLE_HINTS", "keeps_files_locally", "fs", "root", "location"} <= set(names)
    assert len(names) == len(set(names))
    for spec in plugin.BACKEND_ATTRIBUTES:
        assert spec.doc and spec.kind and spec.on in ("class", "instance"), spec
        assert f"`{spec.name}" in DOCS, f"{spec.name} is not in docs/plugins.md"
    # Nothing ckptkit calls on a backend may be a bare attribute: those are hooks.
    assert not set(names) & set(_specs())


def test_public_names_are_the_ones_ckptkit_uses():
    assert plugin.hookimpl is ckptkit.hookimpl
    assert plugin.hookimpl.project_name == "ckptkit"
    from ckptkit.storage import FileBackend

    assert plugin.FileBackend is FileBackend
    assert callable(plugin.FileBackend.multipart) and not hasattr(plugin.FileBackend, "_multipart")


@pytest.mark.parametrize("distribution", ["ckptkit-s3", "ckptkit-gcs", "ckptkit-mlflow"])
def test_the_plugins_we_ship_import_nothing_of_ckptkit_but_its_public_api(distribution):
    """Our own plugins are what a third-party author copies from: one that reached into a private
    module would break with a release that third parties are told is compatible."""
    import ast

    src = pathlib.Path(__file__).resolve().parents[1] / "plugins" / distribution / "src"
    public = {"ckptkit": set(ckptkit.__all__) | {"plugin"}, "ckptkit.plugin": set(plugin.__all__)}
    private = []
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            used = []  # (module, name) pairs: what the code takes from ckptkit
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                used = [(node.module, a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                used = [(a.name.rpartition(".")[0] or a.name, a.name.rpartition(".")[2]) for a in node.names]
            elif isinstance(node, ast.Attribute):  # ckptkit.<name>, ckptkit.plugin.<name>
                chain, inner = [node.attr], node.value
                while isinstance(inner, ast.Attribute):
                    chain.append(inner.attr)
                    inner = inner.value
                if isinstance(inner, ast.Name) and inner.id == "ckptkit":
                    chain.reverse()
                    used = [("ckptkit", chain[0])] + ([("ckptkit.plugin", chain[1])] if chain[0] == "plugin" and
                                                      len(chain) > 1 else [])
            private += [f"{path.name}:{node.lineno} {module}.{name}" for module, name in used
                        if module.split(".")[0] == "ckptkit" and name not in public.get(module, ())
                        and f"{module}.{name}" not in ("ckptkit.ckptkit",)]
    assert list(src.rglob("*.py")) and not private, sorted(set(private))


def test_manifest_serialises_and_parses():
    payload = plugin.Payload(run_name="r", step=3, epoch=1, format="torch",
                             files=(plugin.PayloadFile(name="state.pt", write=lambda f: f.write(b"x")),),
                             metrics={"loss": float("nan")})
    manifest = payload.manifest({"state.pt": plugin.FileEntry(size=1, digest="xxh3_128:00")})
    text = manifest.to_json()
    back = plugin.Manifest.from_json(text)
    assert back.step == 3 and back.files == manifest.files and str(back.metrics["loss"]) == "nan"
    with pytest.raises(ValueError, match="checksum"):
        plugin.Manifest.from_json(text.replace(b'"step": 3', b'"step": 4'))


class _ClientHiccup(Exception):
    """An error type of some storage client that ckptkit does not know."""


def test_retry_policy_from_config_and_a_clients_own_transient_errors():
    policy = plugin.RetryPolicy.from_config("backends.x.retry", {"attempts": 3, "backoff_s": 0})
    assert policy.attempts == 3 and policy.backoff_s == 0
    with pytest.raises(ConfigError, match=r"backends\.x\.retry\.atempts"):
        plugin.RetryPolicy.from_config("backends.x.retry", {"atempts": 3})

    def flaky(failures: list[BaseException]):
        def call():
            if failures:
                raise failures.pop(0)
            return "done"
        return call

    with pytest.raises(_ClientHiccup):
        policy.call("reading x", flaky([_ClientHiccup("503")]))
    assert not plugin.is_transient(_ClientHiccup("503"))
    marked = policy.with_transient(_ClientHiccup)
    assert marked.call("reading x", flaky([_ClientHiccup("1"), _ClientHiccup("2")])) == "done"
    with pytest.raises(plugin.RetriesExhausted, match="gave up after 3 attempts"):
        marked.call("reading x", flaky([_ClientHiccup(str(i)) for i in range(3)]))
    # A predicate marks only some errors of a type (a client's HTTP error with its status).
    by_status = policy.with_transient(lambda e: isinstance(e, _ClientHiccup) and "503" in str(e))
    assert by_status.call("reading x", flaky([_ClientHiccup("503")])) == "done"
    with pytest.raises(_ClientHiccup, match="404"):
        by_status.call("reading x", flaky([_ClientHiccup("404")]))
    assert attrs.evolve(policy, transient=[_ClientHiccup]).transient == (_ClientHiccup,)


# -- documented attributes are checked -------------------------------------------------------


def _with_hook(namespace: dict) -> type:
    def publish_final(self, run_name, payload):
        return None

    namespace.setdefault("from_config", classmethod(lambda cls, name, options: cls()))
    namespace["publish_final"] = plugin.hookimpl(publish_final)
    return type("Odd", (), namespace)


@pytest.mark.parametrize("namespace, message", [
    ({"ROLE_HINTS": ["resume"]}, "attribute ROLE_HINTS must be a dict from a role name"),
    ({"ROLE_HINTS": {"resmue": "typo"}}, "attribute ROLE_HINTS must be a dict from a role name"),
    ({"keeps_files_locally": "yes"}, "attribute keeps_files_locally must be a bool, got str"),
])
def test_a_class_attribute_of_the_wrong_type_is_refused_when_the_type_is_added(namespace, message):
    pm = make_plugin_manager(autoload=False)
    with pytest.raises(PluginError) as info:
        pm.add_backend_type("odd", _with_hook(namespace), "ckptkit-odd 0.2")
    text = str(info.value)
    assert "'odd'" in text and "Odd" in text and "ckptkit-odd 0.2" in text and message in text
    assert "odd" not in pm.backend_types


@pytest.mark.parametrize("old, new", [("_multipart", "multipart"), ("_stale_uploads", "stale_uploads"),
                                      ("_local_dir", "local_dir"), ("_location", "place")])
def test_an_override_of_a_formerly_private_step_is_pointed_out(old, new):
    Old = type("Old", (plugin.FileBackend,), {
        "from_config": classmethod(lambda cls, name, options: None), old: lambda self, *args: None})
    assert callable(getattr(plugin.FileBackend, new)) and not hasattr(plugin.FileBackend, old)
    with pytest.raises(PluginError, match=rf"'old'.*ckptkit-old 1\.0.*defines {old}.*rename it to {new}"):
        make_plugin_manager(autoload=False).add_backend_type("old", Old, "ckptkit-old 1.0")


def _write_dist(site: pathlib.Path, dist_name: str, module: str, body: str | None,
                entry_points: str | None) -> None:
    if body is not None:
        (site / f"{module}.py").write_text(textwrap.dedent(body))
    info = site / f"{dist_name.replace('-', '_')}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.3\n"
                                   "Requires-Dist: ckptkit>=0.4\n")
    if entry_points is not None:
        (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path to install fake third-party distributions into; their modules are
    forgotten afterwards."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:
        if name.startswith("ckptkit_dav"):
            sys.modules.pop(name, None)


_DAV_OK = """
    import fsspec
    from ckptkit.plugin import FileBackend, hookimpl

    class DavBackend(FileBackend):
        @classmethod
        def from_config(cls, name, options):
            backend = cls(name, fsspec.filesystem("memory"), "/dav")
            backend.root = options.get("root", backend.root)
            return backend
"""


def _config(type_name: str = "webdav", **options) -> dict:
    return {"backends": {"dav": {"type": type_name, **options}}, "roles": {"final": {"backends": ["dav"]}}}


def _config_error(exc_type, config: dict) -> str:
    pm = make_plugin_manager(autoload=True)
    with pytest.raises(exc_type) as info:
        CheckpointManager.from_config(config, plugin_manager=pm)
    return str(info.value)


def test_an_instance_attribute_of_the_wrong_type_is_refused_naming_the_backend_and_distribution(site):
    _write_dist(site, "ckptkit-dav", "ckptkit_dav_attr", _DAV_OK,
                "[ckptkit.backends]\nwebdav = ckptkit_dav_attr:DavBackend\n")
    text = _config_error(PluginError, _config(root=5))
    assert "backend 'dav' (type 'webdav'" in text and "ckptkit-dav 0.3" in text
    assert "attribute root must be a str, got int" in text


def test_a_distribution_without_a_backends_entry_point_is_named(site):
    _write_dist(site, "ckptkit-webdav", "ckptkit_dav_noep", _DAV_OK,
                "[console_scripts]\ndav-tool = ckptkit_dav_noep:main\n")
    text = _config_error(ConfigError, _config())
    assert text.startswith("backends.dav.type: unknown backend type 'webdav'")
    assert "the distribution ckptkit-webdav 0.3 is installed" in text
    assert "declares no entry point in the group 'ckptkit.backends' (only in: console_scripts)" in text
    assert '[project.entry-points."ckptkit.backends"]\nwebdav = ' in text


def test_an_entry_point_in_a_misspelt_group_is_named(site):
    _write_dist(site, "ckptkit-webdav", "ckptkit_dav_group", _DAV_OK,
                "[ckptkit.backend]\nwebdav = ckptkit_dav_group:DavBackend\n")
    text = _config_error(ConfigError, _config())
    assert "ckptkit-webdav 0.3 is installed" in text
    assert "in the group 'ckptkit.backend' instead of 'ckptkit.backends'" in text


def test_an_unrelated_type_name_gets_no_distribution_hint(site):
    text = _config_error(ConfigError, _config("lcoal"))
    assert "is installed" not in text and "did you mean 'local'?" in text


@pytest.mark.parametrize("value, message", [
    ("ckptkit_dav_typo:DavBackned",
     "its entry point value 'ckptkit_dav_typo:DavBackned' is wrong: ckptkit_dav_typo has no attribute "
     "'DavBackned' (did you mean 'DavBackend'?)"),
    ("ckptkit_dav_tpyo:DavBackend",
     "its entry point value 'ckptkit_dav_tpyo:DavBackend' is wrong: there is no module 'ckptkit_dav_tpyo'"),
    ("ckptkit_dav_typo", "names a module, not a class; write it as 'ckptkit_dav_typo:<BackendClass>'"),
])
def test_a_typo_in_the_entry_point_says_the_value_is_wrong_not_reinstall(site, value, message):
    _write_dist(site, "ckptkit-dav", "ckptkit_dav_typo", _DAV_OK, f"[ckptkit.backends]\nwebdav = {value}\n")
    text = _config_error(PluginError, _config())
    assert text.startswith("backends.dav.type: backend type 'webdav' from ckptkit-dav 0.3 failed to load")
    assert message in text
    assert "fix the entry point in ckptkit-dav's packaging" in text
    assert "reinstall or" not in text


def test_a_missing_dependency_names_it(site):
    _write_dist(site, "ckptkit-dav", "ckptkit_dav_dep", "import webdav_client_not_installed\n",
                "[ckptkit.backends]\nwebdav = ckptkit_dav_dep:DavBackend\n")
    text = _config_error(PluginError, _config())
    assert "importing ckptkit_dav_dep needs the module 'webdav_client_not_installed', which is not installed" in text
    assert "install ckptkit-dav's dependencies" in text


@pytest.mark.parametrize("body, hook", [
    # A class that marks nothing.
    ("""
        class DavBackend:
            @classmethod
            def from_config(cls, name, options): return cls()
            def publish_final(self, run_name, payload): return None
     """, "publish_final"),
    # A FileBackend subclass overriding a hook without the marker: the hook would vanish.
    ("""
        from ckptkit.plugin import FileBackend

        class DavBackend(FileBackend):
            @classmethod
            def from_config(cls, name, options): raise AssertionError("never built")
            def open_file(self, ref, name): return super().open_file(ref, name)
     """, "open_file"),
])
def test_a_hook_without_hookimpl_is_pointed_out(site, body, hook):
    _write_dist(site, "ckptkit-dav", "ckptkit_dav_unmarked", body,
                "[ckptkit.backends]\nwebdav = ckptkit_dav_unmarked:DavBackend\n")
    text = _config_error(PluginError, _config())
    assert "ckptkit-dav 0.3" in text
    assert f"{hook} is named like the ckptkit hook {hook} but is not marked as a hook implementation" in text
    assert "@hookimpl" in text


@pytest.mark.parametrize("off_by, fix", [
    ("the variable", r"unset CKPTKIT_DISABLE_PLUGIN_AUTOLOAD"),
    # Switched off in code, with the variable unset: telling to unset it sent authors astray.
    ("code", r"build the plugin manager with autoload=True, or call load_backend_entrypoints\(\)"),
])
def test_an_installed_plugin_with_autoload_off_says_so(site, monkeypatch, off_by, fix):
    _write_dist(site, "ckptkit-dav", "ckptkit_dav_off", _DAV_OK,
                "[ckptkit.backends]\nwebdav = ckptkit_dav_off:DavBackend\n")
    if off_by == "the variable":
        monkeypatch.setenv("CKPTKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
        pm = make_plugin_manager()
    else:
        monkeypatch.delenv("CKPTKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
        pm = make_plugin_manager(autoload=False)
    with pytest.raises(ConfigError, match=r"ckptkit-dav 0\.3 declares it, but loading installed plugins is "
                                          rf"switched off \({fix}, or add the type"):
        CheckpointManager.from_config(_config(), plugin_manager=pm)


def test_two_installed_plugins_of_one_type_with_autoload_off_say_to_uninstall_one(site, monkeypatch):
    """Told to switch loading on, the user then met the clash the hint had not named."""
    _write_dist(site, "ckptkit-dav", "ckptkit_dav_off", _DAV_OK,
                "[ckptkit.backends]\nwebdav = ckptkit_dav_off:DavBackend\n")
    _write_dist(site, "ckptkit-dav-fork", "ckptkit_dav_fork", _DAV_OK.replace("ckptkit_dav_off", "ckptkit_dav_fork"),
                "[ckptkit.backends]\nwebdav = ckptkit_dav_fork:DavBackend\n")
    monkeypatch.setenv("CKPTKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    with pytest.raises(ConfigError, match=r"ckptkit-dav 0\.3 and ckptkit-dav-fork 0\.3 declare it, so loading "
                                          r"installed plugins \(switched off: unset CKPTKIT_DISABLE_PLUGIN_AUTOLOAD\) "
                                          r"would refuse it too; uninstall all but one of them"):
        CheckpointManager.from_config(_config(), plugin_manager=make_plugin_manager())


def test_a_documented_type_that_nothing_declares_names_its_extra(monkeypatch):
    from ckptkit import plugins

    monkeypatch.setitem(plugins.KNOWN_EXTRAS, "azure", "azure")
    text = _config_error(ConfigError, _config("azure"))
    assert 'pip install -c constraints.txt ".[azure]" ./plugins/ckptkit-azure' in text and "switched off" not in text
    assert 'pip install --index-url URL "ckptkit[azure]"' in text and "docs/install.md" in text
    # Given in other case: the same hint, and the name as it is spelt.
    text = _config_error(ConfigError, _config("Azure"))
    assert "type names are lower case: 'azure'" in text and 'pip install -c constraints.txt ".[azure]"' in text


class _WrongAnswers(ckptkit.local.LocalBackend):
    """The local backend, but listing and pruning answer with what is not a list of checkpoints."""

    listing: object = None
    pruned: object = None

    @ckptkit.hookimpl
    def list_checkpoints(self, run_name):
        got = super().list_checkpoints(run_name=run_name)
        return {r.step: r for r in got} if _WrongAnswers.listing == "dict" else got

    @ckptkit.hookimpl
    def prune(self, run_name, keep_last, protected_steps, dry_run, counted_steps):
        super().prune(run_name=run_name, keep_last=keep_last, protected_steps=protected_steps, dry_run=dry_run,
                      counted_steps=counted_steps)
        return None  # deleted some, says nothing


def test_a_listing_or_prune_that_returns_no_list_of_checkpoints_is_named_as_the_plugins_fault(tmp_path, monkeypatch):
    """A prune returning None was read as one that deleted nothing (ckptkit prune printed
    "nothing to delete" while three checkpoints went), and a listing returning a dict ended in a
    bare AttributeError naming no plugin."""
    from ckptkit import BackendError
    from ckptkit.plugins import make_plugin_manager

    pm = make_plugin_manager(autoload=False)
    pm.add_backend_type("wrong", _WrongAnswers, "ckptkit-wrong 0.1")
    cfg = {"run_name": "r", "backends": {"w": {"type": "wrong", "path": str(tmp_path)}},
           "roles": {"resume": {"backends": ["w"], "every_n_steps": 1, "keep_last": 5}}}
    import torch

    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model = torch.nn.Linear(2, 2)
    for step in range(4):
        ck.save(step=step, model=model)
    with pytest.raises(BackendError, match=r"backend 'w': prune \(type 'wrong', from ckptkit-wrong 0.1\) returned "
                                           r"NoneType, not a list of CheckpointRef; the backend plugin is faulty"):
        ck.prune(keep_last=1)
    monkeypatch.setattr(_WrongAnswers, "listing", "dict")
    with pytest.raises(BackendError, match=r"list_checkpoints \(type 'wrong', from ckptkit-wrong 0.1\) returned dict"):
        ck.restore(model=model)
    ck.close()


class _FaultyIO(ckptkit.local.LocalBackend):
    """The local backend, but its save raises a plain exception and its manifests come back as bytes."""

    @ckptkit.hookimpl
    def save_resume(self, run_name, step, payload):
        raise KeyError("bucket_region")

    @ckptkit.hookimpl
    def read_manifest(self, ref):
        return super().read_manifest(ref=ref).to_json()


def test_a_plugins_own_save_failure_and_a_manifest_of_the_wrong_type_name_the_plugin(tmp_path):
    """A save's KeyError said only "KeyError: 'bucket_region'"; a manifest read as bytes called the
    checkpoint damaged, which skips it for an older step or gives the whole run up for lost."""
    from ckptkit import BackendError, SaveError
    from ckptkit.plugins import make_plugin_manager
    import torch

    pm = make_plugin_manager(autoload=False)
    pm.add_backend_type("faulty", _FaultyIO, "ckptkit-faulty 0.2")
    cfg = {"run_name": "r", "backends": {"f": {"type": "faulty", "path": str(tmp_path / "f")},
                                         "disk": {"type": "local", "path": str(tmp_path / "disk")}},
           "roles": {"resume": {"backends": ["f", "disk"], "every_n_steps": 1, "keep_last": 5}}}
    model = torch.nn.Linear(2, 2)
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        with pytest.raises(SaveError, match=r"f: save_resume \(type 'faulty', from ckptkit-faulty 0.2\) raised "
                                            r"KeyError: 'bucket_region'"):
            ck.save(step=1, model=model)
    shutil.copytree(tmp_path / "disk", tmp_path / "f")
    cfg["roles"]["resume"]["backends"] = ["f"]
    del cfg["backends"]["disk"]
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        with pytest.raises(BackendError, match=r"read_manifest \(type 'faulty', from ckptkit-faulty 0.2\) returned "
                                               r"bytes for .*step-0000000001, not a Manifest; the backend plugin is "
                                               "faulty"):
            ck.restore(model=model)


class _StrayRefs(ckptkit.local.LocalBackend):
    """The local backend, but answering with refs of another run, another backend or another
    step, or failing to read its manifests with a plain exception, as ``mode`` says."""

    mode: str | None = None

    @ckptkit.hookimpl
    def list_checkpoints(self, run_name):
        got = super().list_checkpoints(run_name=run_name)
        if _StrayRefs.mode == "other_run":
            return [attrs.evolve(r, run_name="other-run") for r in got]
        if _StrayRefs.mode == "other_backend":
            return [attrs.evolve(r, backend="disk") for r in got]
        return got

    @ckptkit.hookimpl
    def commit_sharded(self, run_name, step, path, payload, files):
        ref = super().commit_sharded(run_name=run_name, step=step, path=path, payload=payload, files=files)
        return attrs.evolve(ref, run_name="other-run") if _StrayRefs.mode == "sharded_other_run" else ref

    @ckptkit.hookimpl
    def save_resume(self, run_name, step, payload):
        ref = super().save_resume(run_name=run_name, step=step, payload=payload)
        if _StrayRefs.mode == "previous_step":  # says it committed the step before
            return next(r for r in super().list_checkpoints(run_name=run_name) if r.step == step - 1)
        return ref

    @ckptkit.hookimpl
    def read_manifest(self, ref):
        if _StrayRefs.mode == "manifest_bug":
            raise KeyError("region")
        return super().read_manifest(ref=ref)

    @ckptkit.hookimpl
    def prune(self, run_name, keep_last, protected_steps, dry_run, counted_steps):
        if _StrayRefs.mode == "prune_bug":
            raise KeyError("region")
        if _StrayRefs.mode == "prune_down":
            raise ConnectionResetError("the store hung up")
        return super().prune(run_name=run_name, keep_last=keep_last, protected_steps=protected_steps,
                             dry_run=dry_run, counted_steps=counted_steps)


@pytest.fixture
def stray(tmp_path, monkeypatch):
    """A config with the stray plugin's backend first (it keeps files locally: later backends copy
    from it) and the local one second, and a model whose weights are its step."""
    import torch

    pm = make_plugin_manager(autoload=False)
    pm.add_backend_type("stray", _StrayRefs, "ckptkit-stray 0.3")
    monkeypatch.setattr(_StrayRefs, "mode", None)
    cfg = {"run_name": "r", "backends": {"s": {"type": "stray", "path": str(tmp_path / "s")},
                                         "disk": {"type": "local", "path": str(tmp_path / "disk")}},
           "roles": {"resume": {"backends": ["s", "disk"], "every_n_steps": 1, "keep_last": 5}}}
    model = torch.nn.Linear(2, 2)

    def save(ck, step):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(step)
        return ck.save(step=step, model=model)

    return pm, cfg, model, save


def test_a_save_answered_with_another_steps_ref_is_the_plugins_fault_and_not_copied(stray, monkeypatch):
    """A backend that keeps files locally and said it committed step N-1 when asked for step N
    had the next backend copy step N-1's files, and commit them, as step N: a restore gave the
    older weights, and verify found nothing wrong."""
    import torch
    from ckptkit import SaveError

    pm, cfg, model, save = stray
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        for step in (1, 2):
            save(ck, step)
        monkeypatch.setattr(_StrayRefs, "mode", "previous_step")
        with pytest.raises(SaveError, match=r"s: save_resume \(type 'stray', from ckptkit-stray 0.3\) returned a ref "
                                            r"of backend 's', run 'r', step 2 .*not one of backend 's', run 'r', "
                                            r"step 3; the backend plugin is faulty") as info:
            save(ck, 3)
        # The hook ran: what it stored is not known, and not told as left as it was.
        assert "What 's' stored is not known: it may hold step 3" in str(info.value), info.value
        assert "as it was" not in str(info.value)
    cfg["roles"]["resume"]["backends"] = ["disk"]
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        restored = ck.restore(model=model)
    assert restored.step == 3 and torch.equal(model.weight, torch.full((2, 2), 3.0))


@pytest.mark.parametrize("mode, stray_part", [("other_run", r"run 'other-run'"), ("other_backend", r"backend 'disk'")])
def test_a_listing_of_another_run_or_backend_is_the_plugins_fault_not_restored(stray, monkeypatch, mode, stray_part):
    """A listing whose refs named another run had restore load that run's weights without a word
    (the manifest was checked against the ref's run, not the manager's); one naming another
    backend had that backend read the plugin's folders."""
    from ckptkit import BackendError

    pm, cfg, model, save = stray
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        save(ck, 1)
    monkeypatch.setattr(_StrayRefs, "mode", mode)
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        with pytest.raises(BackendError, match=rf"'s': list_checkpoints \(type 'stray', from ckptkit-stray 0.3\) returned "
                                               rf"a ref of .*{stray_part}.*the backend plugin is faulty"):
            ck.restore(model=model)


def test_a_plugins_own_exception_reading_a_manifest_names_it_and_is_not_taken_for_damage(stray, monkeypatch):
    """A KeyError from read_manifest reached the user bare ("KeyError: 'region'"), naming no
    backend, hook or distribution."""
    from ckptkit import BackendError

    pm, cfg, model, save = stray
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        save(ck, 1)
    monkeypatch.setattr(_StrayRefs, "mode", "manifest_bug")
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        with pytest.raises(BackendError, match=r"'s': read_manifest \(type 'stray', from ckptkit-stray 0.3\) raised "
                                               r"KeyError: 'region'; report it to the plugin's authors"):
            ck.restore(model=model)


@pytest.mark.parametrize("mode, told, raised", [
    ("prune_bug", "backend 's': prune (type 'stray', from ckptkit-stray 0.3) raised KeyError: 'region'",
     ckptkit.BackendError),
    ("prune_down", "the store hung up", ConnectionResetError),  # the store's failure, not the plugin's bug
])
def test_a_plugins_own_exception_while_pruning_names_it(stray, monkeypatch, caplog, mode, told, raised):
    """After a save the log said only "pruning backend 's' failed (nothing committed was lost):
    'region'" (which ckptkit cannot know of a plugin's prune); ckptkit prune printed a bare
    KeyError traceback."""
    pm, cfg, model, save = stray
    monkeypatch.setattr(_StrayRefs, "mode", mode)
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        with caplog.at_level("WARNING", logger="ckptkit.manager"):
            save(ck, 1)
            ck.wait()
        assert f"pruning backend 's' failed: {told}" in caplog.text
        assert [r.levelname for r in caplog.records if "pruning backend" in r.getMessage()] == ["WARNING"]
        with pytest.raises(raised, match=re.escape(told)):
            ck.prune()


def test_a_sharded_commit_answered_with_another_runs_ref_fails_that_backend(stray, monkeypatch):
    """commit_sharded's ref was taken as it came: another run's was reported saved, and pruned as this run's."""
    from ckptkit import SaveError

    pm, cfg, model, save = stray
    cfg["roles"]["resume"]["format"] = "dcp"
    monkeypatch.setattr(_StrayRefs, "mode", "sharded_other_run")
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        with pytest.raises(SaveError, match=r"commit_sharded \(type 'stray', from ckptkit-stray 0.3\) returned a ref "
                                            r"of backend 's', run 'other-run', step 1 .*the backend plugin is faulty") as info:
            save(ck, 1)
        assert [(r.backend, r.run_name) for r in info.value.saved] == [("disk", "r")]


class _Registry:
    """A final-only backend whose refs keep CheckpointRef's default role, as a registry plugin may."""

    @classmethod
    def from_config(cls, name, options):
        return cls(name)

    def __init__(self, name):
        self.name = name

    @ckptkit.hookimpl
    def publish_final(self, run_name, payload):
        from ckptkit.checkpoint import CheckpointRef

        return CheckpointRef(backend=self.name, run_name=run_name, step=payload.step, path="m/1", uri="registry://m/1")


def test_a_final_ref_left_at_the_default_role_is_accepted(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)  # a refused ref would put the model in ./ckptkit-fallback

    pm = make_plugin_manager(autoload=False)
    pm.add_backend_type("registry", _Registry, "ckptkit-registry 0.1")
    cfg = {"run_name": "r", "backends": {"reg": {"type": "registry"}}, "roles": {"final": {"backends": ["reg"]}}}
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        saved = ck.finalize(model=torch.nn.Linear(2, 2), step=3)
    assert [(r.backend, r.uri) for r in saved] == [("reg", "registry://m/1")]


def test_a_file_backend_over_this_machines_files_says_so_through_local_dir(tmp_path):
    """Saying where a path lies on this machine took overriding a private method: now local_dir,
    which the refs carry, and restore reads from in place."""
    import torch
    from fsspec.implementations.local import LocalFileSystem

    class Plain(plugin.FileBackend):
        @classmethod
        def from_config(cls, name, options):
            return cls(name, LocalFileSystem(auto_mkdir=True), options["path"])

    class InPlace(Plain):
        def local_dir(self, path):
            return path

    made = {}
    for cls in (Plain, InPlace):
        pm = make_plugin_manager(autoload=False)
        pm.add_backend_type("mine", cls)
        backend = type("B", (), {"name": cls.__name__.lower()})
        cfg = {"run_name": "r", "backends": {backend.name: {"type": "mine", "path": str(tmp_path / backend.name)}},
               "roles": {"resume": {"backends": [backend.name], "every_n_steps": 1}}}
        model = torch.nn.Linear(3, 2)
        with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
            ck.save(step=1, model=model)
            (made[cls],) = ck.list_checkpoints()
            restored = torch.nn.Linear(3, 2)
            assert ck.restore(model=restored).step == 1
            assert torch.equal(restored.weight, model.weight)
    assert made[Plain].local_dir is None
    assert made[InPlace].local_dir == made[InPlace].path and os.path.isdir(made[InPlace].local_dir)


def test_two_backends_whose_options_name_one_store_two_ways_are_one_place_once_place_says_so(tmp_path):
    """Two resume backends of a third-party filesystem whose roots spell one folder two ways held
    one copy: the check compared their options as written, and no public step could say better."""
    from fsspec.implementations.memory import MemoryFileSystem

    class Spelled(plugin.FileBackend):
        """A store named by a filesystem option (as a bucket or a base folder is): root is within it."""

        @classmethod
        def from_config(cls, name, options):
            return cls(name, MemoryFileSystem(base=options["base"]), f"/{tmp_path.name}-{cls.__name__}")

    class Normalised(Spelled):
        def place(self):
            return (self.fs.protocol, self.fs.storage_options["base"].rstrip("/"), self.root)

    for cls, refused in ((Spelled, False), (Normalised, True)):
        pm = make_plugin_manager(autoload=False)
        pm.add_backend_type("spelled", cls)
        cfg = {"run_name": "r", "backends": {"a": {"type": "spelled", "base": "team/ckpts"},
                                             "b": {"type": "spelled", "base": "team/ckpts/"}},
               "roles": {"resume": {"backends": ["a", "b"], "every_n_steps": 1}}}
        if refused:
            with pytest.raises(ConfigError, match="backends 'a' and 'b' both keep resume checkpoints in one place"):
                CheckpointManager.from_config(cfg, plugin_manager=pm)
        else:
            CheckpointManager.from_config(cfg, plugin_manager=pm).close()
