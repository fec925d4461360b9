"""Packaging: the extras name the plugin distributions, the wheels install off this checkout, and
no plugin runs on the unrelated ``ckptkit`` of the public package index."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import ckptkit

REPO = Path(__file__).resolve().parents[1]
PLUGINS = {"s3": "ckptkit-s3", "gcs": "ckptkit-gcs", "mlflow": "ckptkit-mlflow"}
# The public package index's ckptkit: an unrelated checkpoint inspect/convert tool.
FOREIGN_VERSION = "0.3.0"


def extra_requirements() -> dict[str, list[Requirement]]:
    out: dict[str, list[Requirement]] = {}
    for text in importlib.metadata.requires("ckptkit") or []:
        req = Requirement(text)
        for extra in ("s3", "gcs", "mlflow", "all", "test"):
            if req.marker and req.marker.evaluate({"extra": extra}):
                out.setdefault(extra, []).append(req)
    return out


@pytest.mark.parametrize("extra, dist", sorted(PLUGINS.items()))
def test_extra_names_the_plugin_distribution_with_bounds(extra, dist):
    reqs = extra_requirements()
    for found in (reqs[extra], [r for r in reqs["all"] if r.name == dist]):
        assert [r.name for r in found] == [dist]
        (req,) = found
        # A direct reference (file://, a path) would tie the wheel to the machine that built it.
        assert req.url is None, str(req)
        assert ckptkit.__version__ in req.specifier
        assert "99.0" not in req.specifier, f"{req}: an upper bound keeps the plugins in lockstep"
    with open(REPO / "plugins" / dist / "pyproject.toml", "rb") as f:
        assert tomllib.load(f)["project"]["name"] == dist


@pytest.mark.parametrize("dist", sorted(PLUGINS.values()))
def test_plugin_requires_this_ckptkit_and_not_the_public_index_one(dist):
    assert importlib.metadata.version(dist) == ckptkit.__version__, "ckptkit and its plugins release in lockstep"
    (req,) = [r for r in map(Requirement, importlib.metadata.requires(dist) or []) if r.name == "ckptkit"]
    assert ckptkit.__version__ in req.specifier
    assert FOREIGN_VERSION not in req.specifier, f"{dist}'s {req} admits the unrelated ckptkit {FOREIGN_VERSION}"


def test_local_backend_entry_point_is_ckptkits_own():
    eps = importlib.metadata.entry_points(group="ckptkit.backends")
    local = [ep for ep in eps if ep.name == "local"]
    assert [ep.value for ep in local] == ["ckptkit.local:LocalBackend"]
    assert local[0].dist.metadata["Name"] == "ckptkit"


# -- the import-time check against a foreign ckptkit ------------------------------------------

@pytest.fixture(scope="module")
def foreign_ckptkit(tmp_path_factory):
    """A folder holding a package named ckptkit that is not ours, as the public index's would be."""
    root = tmp_path_factory.mktemp("foreign")
    (root / "ckptkit").mkdir()
    (root / "ckptkit" / "__init__.py").write_text(
        f'"""Inspect and convert checkpoints."""\n__version__ = "{FOREIGN_VERSION}"\n')
    (root / "ckptkit" / "inspect.py").write_text("")
    return root


@pytest.mark.parametrize("module", ["ckptkit_s3", "ckptkit_gcs", "ckptkit_mlflow"])
def test_plugin_import_names_a_foreign_ckptkit(module, foreign_ckptkit):
    env = dict(os.environ, PYTHONPATH=str(foreign_ckptkit))  # ahead of site-packages
    out = subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True, text=True,
                         timeout=120, cwd=foreign_ckptkit)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ckptkit-"), out.stderr
    assert str(foreign_ckptkit / "ckptkit" / "__init__.py") in last
    assert f"(version {FOREIGN_VERSION}) is a different project of the same name" in last
    assert "--index-url, never --extra-index-url" in last and "docs/install.md" in last


def test_plugin_import_without_any_ckptkit_says_so(tmp_path):
    # -S leaves site-packages (and editable installs) off the path: only the plugin's source is found.
    src = REPO / "plugins" / "ckptkit-mlflow" / "src"
    code = f"import sys; sys.path.insert(0, {str(src)!r}); import ckptkit_mlflow"
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        "ImportError: ckptkit-mlflow needs ckptkit, which is not installed; see docs/install.md in the ckptkit repository")


# -- wheels built from a copy, installed into a fresh venv ------------------------------------

_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", ".tox", "__pycache__", ".hypothesis", ".pytest_cache",
                                     "*.egg-info", "ckptkit-demo", "mlruns")

_CONFIG = textwrap.dedent("""\
    run_name: smoke
    backends:
      scratch:  {type: local, path: ./ckpts}
      archive:  {type: s3, path: s3://team-bucket/ckpts, storage_options: {endpoint_url: "http://127.0.0.1:9"}}
      registry: {type: mlflow, tracking_uri: "sqlite:///mlflow.db", experiment: smoke}
    roles:
      resume: {backends: [scratch, archive], every_n_steps: 10, keep_last: 2}
      final:  {backends: [registry]}
    """)

_PROBE = """
import importlib.metadata as md, importlib.util, json, ckptkit, ckptkit_s3, ckptkit_mlflow
print(json.dumps({"files": [m.__file__ for m in (ckptkit, ckptkit_s3, ckptkit_mlflow)],
                  "versions": {d: md.version(d) for d in ("ckptkit", "ckptkit-s3", "ckptkit-mlflow")},
                  "gcs": importlib.util.find_spec("ckptkit_gcs") is not None}))
"""


@pytest.mark.slow
def test_wheels_install_extras_into_a_fresh_venv(tmp_path):
    """Minutes: pip installs torch from its file and downloads s3fs and MLflow with their dependencies anew."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")}
    copy, wheels, venv = tmp_path / "copy", tmp_path / "wheels", tmp_path / "venv"
    shutil.copytree(REPO, copy, ignore=_NOT_SOURCE)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(copy),
                    *(str(copy / "plugins" / d) for d in sorted(PLUGINS.values()))],
                   env=env, check=True, capture_output=True, timeout=900)
    shutil.rmtree(copy)  # nothing may point back at the tree the wheels were built from
    built = sorted(p.name for p in wheels.iterdir())
    v = ckptkit.__version__
    assert built == [f"ckptkit-{v}-py3-none-any.whl"] + [f"ckptkit_{e}-{v}-py3-none-any.whl" for e in sorted(PLUGINS)]
    for name in built:  # typed packages: type checkers read the annotations of each
        with zipfile.ZipFile(wheels / name) as whl:
            assert f"{name.split('-')[0]}/py.typed" in whl.namelist(), name
            # The license the metadata declares travels with each wheel, its text included.
            dist_info = f"{name.split('-')[0]}-{v}.dist-info"
            assert "Apache License" in whl.read(f"{dist_info}/licenses/LICENSE").decode(), name
            assert "License-Expression: Apache-2.0" in whl.read(f"{dist_info}/METADATA").decode(), name
    with zipfile.ZipFile(wheels / built[0]) as whl:
        metadata = whl.read(f"ckptkit-{v}.dist-info/METADATA").decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert requires and not [r for r in requires if "@" in r], requires

    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], env=env, check=True, capture_output=True, timeout=300)
        py = venv / "bin" / "python"
        # The constraint lets pip take the torch file on this machine's disk; every other
        # dependency comes from the configured index, ckptkit and its plugins from the wheels only.
        # --no-compile: byte-compiling torch, MLflow and pandas took two thirds of the CPU time.
        install = subprocess.run(
            [str(py), "-m", "pip", "install", "--quiet", "--no-cache-dir", "--no-compile",
             "--find-links", str(wheels), "-c", str(REPO / "constraints.txt"), "ckptkit[s3,mlflow]"],
            env=env, capture_output=True, text=True, timeout=1500)
        assert install.returncode == 0, install.stderr[-4000:]

        probe = json.loads(subprocess.run([str(py), "-c", _PROBE], env=env, check=True, capture_output=True,
                                          text=True, timeout=300, cwd=tmp_path).stdout)
        assert all(Path(f).is_relative_to(venv) for f in probe["files"]), probe["files"]
        assert probe["versions"] == {"ckptkit": v, "ckptkit-s3": v, "ckptkit-mlflow": v}
        assert probe["gcs"] is False  # only the extras asked for

        cli = str(venv / "bin" / "ckptkit")
        backends = json.loads(subprocess.run([cli, "backends", "--json"], env=env, check=True, capture_output=True,
                                             text=True, timeout=300, cwd=tmp_path).stdout)
        assert {b["type"]: b["distribution"] for b in backends} == {
            "local": f"ckptkit {v}", "s3": f"ckptkit-s3 {v}", "mlflow": f"ckptkit-mlflow {v}"}
        (tmp_path / "ckptkit.yaml").write_text(_CONFIG)
        check = json.loads(subprocess.run([cli, "check", "ckptkit.yaml", "--json"], env=env, check=True,
                                          capture_output=True, text=True, timeout=300, cwd=tmp_path).stdout)
        assert [(r["role"], r["backend"], r["distribution"]) for r in check["routes"]] == [
            ("resume", "scratch", f"ckptkit {v}"), ("resume", "archive", f"ckptkit-s3 {v}"),
            ("final", "registry", f"ckptkit-mlflow {v}")]
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # about 2 GB: not left for pytest's kept temp folders


@pytest.mark.parametrize("module, missing, extra", [
    ("ckptkit.integrations.transformers", "transformers", "transformers"),
    ("ckptkit.integrations.lightning", "lightning", "lightning"),
    ("ckptkit.testing", "pytest", "testing"),
])
def test_a_module_whose_optional_dependency_is_missing_names_the_extra(module, missing, extra):
    code = f"import sys; sys.modules[{missing!r}] = None\nimport {module}"  # None: import fails as if absent
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1
    assert f'pip install "ckptkit[{extra}]"' in proc.stderr.splitlines()[-1], proc.stderr[-2000:]
