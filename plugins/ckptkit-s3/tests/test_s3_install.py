"""ckptkit-s3 as a third party installs it: its own distribution, found through its entry point."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import ckptkit
from ckptkit.errors import ConfigError
from ckptkit.plugins import make_plugin_manager

PLUGIN_DIR = Path(__file__).resolve().parents[1]


def test_distribution_declares_the_entry_point_and_its_dependencies():
    dist = importlib.metadata.distribution("ckptkit-s3")
    eps = [ep for ep in dist.entry_points if ep.group == "ckptkit.backends"]
    assert [(ep.name, ep.value) for ep in eps] == [("s3", "ckptkit_s3:S3Backend")]
    requires = {Requirement(r).name for r in dist.requires or []}
    assert {"ckptkit", "s3fs"} <= requires


def test_missing_plugin_names_the_extra_that_installs_it():
    pm = make_plugin_manager(autoload=False)  # only ckptkit's own types: as if ckptkit-s3 were absent
    assert "s3" not in pm.backend_types
    with pytest.raises(ConfigError) as err:
        ckptkit.CheckpointManager.from_config(
            {"backends": {"archive": {"type": "s3", "path": "s3://b/x"}}, "roles": {"resume": {"backends": ["archive"]}}},
            plugin_manager=pm)
    assert "backends.archive.type" in str(err.value)
    if importlib.metadata.entry_points(group="ckptkit.backends", name="s3"):
        # Installed, but not loaded: the error says so instead of suggesting to install it.
        assert "ckptkit-s3" in str(err.value) and "loading installed plugins is switched off" in str(err.value)
    else:
        assert 'pip install -c constraints.txt ".[s3]" ./plugins/ckptkit-s3' in str(err.value)
        assert 'pip install --index-url URL "ckptkit[s3]"' in str(err.value)


_CHECK = r"""
import json, sys, torch, ckptkit, ckptkit_s3
from ckptkit.plugins import make_plugin_manager
pm = make_plugin_manager(autoload=False)
pm.load_backend_entrypoints(only_dist="ckptkit-s3")
btype = pm.backend_types["s3"]
cfg = {"backends": {"a": {"type": "s3", "path": "s3://" + sys.argv[2] + "/p", "storage_options": {"endpoint_url": sys.argv[1]}}},
       "roles": {"resume": {"backends": ["a"], "every_n_steps": 1}, "final": {"backends": ["a"]}}}
m = torch.nn.Linear(3, 3)
ck = ckptkit.CheckpointManager.from_config(cfg, run_name="r", plugin_manager=pm)
ck.save(step=7, model=m)
pm2 = make_plugin_manager(autoload=False); pm2.load_backend_entrypoints(only_dist="ckptkit-s3")
m2 = torch.nn.Linear(3, 3)
step = ckptkit.CheckpointManager.from_config(cfg, run_name="r", plugin_manager=pm2).restore(model=m2).step
print(json.dumps({"module": ckptkit_s3.__file__, "dist": btype.dist, "roles": sorted(r.value for r in btype.roles),
                  "step": step, "equal": bool(torch.equal(m.weight, m2.weight))}))
"""


def test_installed_wheel_is_discovered_and_works(tmp_path, s3_endpoint, bucket):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                    "--target", str(target), str(PLUGIN_DIR)], check=True, capture_output=True)
    assert (target / "ckptkit_s3" / "__init__.py").exists()
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", _CHECK, s3_endpoint, bucket], env=env, check=True,
                         capture_output=True, text=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(result["module"]).is_relative_to(target)  # the installed copy, not the source tree
    assert result["dist"] == f"ckptkit-s3 {importlib.metadata.version('ckptkit-s3')}"
    assert result["roles"] == ["final", "resume"]
    assert (result["step"], result["equal"]) == (7, True)
