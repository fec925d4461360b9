"""`ckptkit check` reports what finalize would refuse: a registered model name whose
{algorithm} nothing fills."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
import yaml

import ckptkit
from ckptkit.cli import main

README = Path(__file__).resolve().parents[3] / "README.md"


def write_config(tmp_path, embedded_uri, **top) -> Path:
    cfg = {**top, "backends": {
        "scratch": {"type": "local", "path": str(tmp_path / "ckpts")},
        "registry": {"type": "mlflow", "tracking_uri": embedded_uri, "experiment": "check",
                     "registered_model_name": "wmtp_{algorithm}"}},
        "roles": {"resume": {"backends": ["scratch"]}, "final": {"backends": ["registry"]}}}
    path = tmp_path / "ckptkit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_check_reports_an_algorithm_placeholder_that_nothing_fills(tmp_path, embedded_uri, capsys):
    code = main(["check", str(write_config(tmp_path, embedded_uri))])
    out, err = capsys.readouterr()
    assert code == 1 and "config OK" not in out
    assert "backend 'registry'" in err and "{algorithm}" in err
    assert "ckptkit publish --algorithm" in err and "set algorithm in the config" in err

    code = main(["check", str(write_config(tmp_path, embedded_uri, algorithm="sft")), "--json"])
    out, _ = capsys.readouterr()
    assert code == 0 and json.loads(out)["problems"] == []


def test_from_config_warns_and_finalize_names_the_publish_flag(tmp_path, embedded_uri, caplog):
    with caplog.at_level(logging.WARNING, logger="ckptkit"):
        ck = ckptkit.CheckpointManager.from_config(str(write_config(tmp_path, embedded_uri)), run_name="r1")
    assert any("{algorithm}" in r.getMessage() for r in caplog.records)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ckptkit.PublishError, match="ckptkit publish --algorithm"):
        ck.finalize(model=model, step=1)
    ck.close()


def test_the_readme_config_passes_check(tmp_path, monkeypatch, capsys):
    block = re.search(r"```yaml\n(.*?)```", README.read_text(), re.S).group(1)
    cfg = yaml.safe_load(block)
    assert "{algorithm}" in json.dumps(cfg), "the README example still shows the placeholder"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckptkit.yaml").write_text(yaml.safe_dump(cfg))
    code = main(["check", "ckptkit.yaml", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["problems"] == []
