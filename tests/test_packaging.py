"""The extras point at the plugin distributions of this checkout, and those exist."""

import importlib.metadata
import os
import re
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGINS = {"s3": "ckptkit-s3", "gcs": "ckptkit-gcs", "mlflow": "ckptkit-mlflow"}


def extra_requirements() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for req in importlib.metadata.requires("ckptkit") or []:
        m = re.search(r"extra\s*==\s*['\"]([\w-]+)['\"]", req)
        if m:
            out.setdefault(m.group(1), []).append(req.split(";")[0].strip())
    return out


@pytest.mark.parametrize("extra, dist", sorted(PLUGINS.items()))
def test_extra_installs_its_plugin_from_this_checkout(extra, dist):
    reqs = extra_requirements()
    mine = [r for r in reqs[extra] if r.startswith(f"{dist} @ file://")]
    assert len(mine) == 1, reqs[extra]
    # The URI is wherever the package was built from (the checkout, or a copy of it).
    assert mine[0].endswith(f"/plugins/{dist}")
    with open(os.path.join(REPO, "plugins", dist, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["name"] == dist
    assert any(r.startswith(f"{dist} @ ") for r in reqs["all"])
    assert importlib.metadata.version(dist), f"{dist} is installed in the test environment"


def test_local_backend_entry_point_is_ckptkits_own():
    eps = importlib.metadata.entry_points(group="ckptkit.backends")
    local = [ep for ep in eps if ep.name == "local"]
    assert [ep.value for ep in local] == ["ckptkit.local:LocalBackend"]
    assert local[0].dist.metadata["Name"] == "ckptkit"
