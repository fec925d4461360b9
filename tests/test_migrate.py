"""``ckptkit migrate-config``: a trainer's checkpoint settings become a ckptkit config that loads."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from ckptkit.cli import main
from ckptkit.config import Config
from ckptkit.migrate import migrate

pytest.importorskip("ckptkit_s3", reason="the s3:// cases need the ckptkit-s3 plugin (tox installs it)")
pytest.importorskip("ckptkit_mlflow", reason="the mlflow cases need the ckptkit-mlflow plugin (tox installs it)")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def flat(text: str) -> str:
    """The explanation with its line wrapping undone."""
    return " ".join(text.split())


def trainer(base_path: str, **changes) -> dict:
    cfg = {"model": {"n_layer": 12},
           "paths": {"data": "/data/wmtp",
                     "checkpoints": {"base_path": base_path, "save_interval": 1000, "keep_last": 5,
                                     "save_final": True}},
           "mlflow": {"experiment": "wmtp", "tracking_uri": "http://127.0.0.1:5000",
                      "registry_uri": "http://127.0.0.1:5000"}}
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = cfg
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return cfg


def write(tmp_path, cfg: dict, name: str = "trainer.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_file_uri_becomes_a_local_config_that_checks(tmp_path, capsys):
    source = write(tmp_path, trainer(f"file://{tmp_path}/ckpts"))
    out_file = str(tmp_path / "ckptkit.yaml")
    code, out, err = run(capsys, "migrate-config", source, "-o", out_file)
    assert code == 0, err
    out = flat(out)
    # The explanation: each ckptkit setting, the trainer key it came from, and why.
    assert "roles.resume.every_n_steps <- paths.checkpoints.save_interval: save(step=...) writes" in out
    assert "roles.resume.keep_last <- paths.checkpoints.keep_last: after each save, the newest 5" in out
    assert "never to MLflow" in out and "it uploads a copy" in out  # local final: MLflow needs its own
    assert "left to the trainer (not checkpoint settings): model, paths.data" in out
    assert f"check it with: ckptkit check {out_file}" in out

    config = Config.from_file(out_file)
    assert config.backends["checkpoints"].type == "local"
    assert config.resume.backends == ("checkpoints",) and config.resume.every_n_steps == 1000
    assert config.resume.keep_last == 5
    assert config.final.backends == ("checkpoints", "registry")
    assert config.backends["registry"].options == {"tracking_uri": "http://127.0.0.1:5000", "experiment": "wmtp"}
    code, out, err = run(capsys, "check", out_file, "--json")
    assert code == 0, err
    routes = json.loads(out)["routes"]
    assert {(r["role"], r["backend"], r["location"]) for r in routes} >= {
        ("resume", "checkpoints", f"file://{tmp_path}/ckpts")}
    assert sorted(os.listdir(tmp_path)) == ["ckptkit.yaml", "trainer.yaml"], "nothing was created"


def test_s3_uri_becomes_an_s3_config_whose_registry_keeps_only_a_uri(tmp_path, capsys):
    source = write(tmp_path, trainer("s3://ml-team/wmtp/checkpoints/"))
    code, out, err = run(capsys, "migrate-config", source)
    assert code == 0, err
    # Without --out the config goes to stdout, every setting under a comment saying why.
    config = yaml.safe_load(out)
    assert config == migrate(trainer("s3://ml-team/wmtp/checkpoints/")).config
    assert config["backends"]["checkpoints"] == {"type": "s3", "path": "s3://ml-team/wmtp/checkpoints"}
    comments = [line.strip() for line in out.splitlines() if line.strip().startswith("#")]
    for key in ("paths.checkpoints.base_path", "paths.checkpoints.save_interval", "paths.checkpoints.keep_last",
                "paths.checkpoints.save_final", "mlflow.tracking_uri", "mlflow.experiment"):
        assert any(c.startswith(f"# {key}: ") for c in comments), key
    assert "records the URI of that copy instead of uploading a second one" in flat(" ".join(c[1:] for c in comments))

    out_file = tmp_path / "ckptkit.yaml"
    out_file.write_text(out)
    # check builds every backend without contacting the store or the tracking server.
    code, out, err = run(capsys, "check", str(out_file))
    assert code == 0 and "config OK" in out, err
    code, out, err = run(capsys, "plan", str(out_file), "--state-size", "14GB", "--steps", "30000", "--json")
    totals = json.loads(out)["totals"]
    assert code == 0 and totals["end"] == 5 * 14 * 10**9 + 14 * 10**9, "5 resume copies and one final file"
    assert totals["duplicate_end"] == totals["end"] + 30 * 14 * 10**9 + 14 * 10**9


@pytest.mark.parametrize("change, key", [
    ({"paths__checkpoints__upload_to_mlflow": True}, "paths.checkpoints.upload_to_mlflow"),
    ({"mlflow__run_name": "x"}, "mlflow.run_name"),
    ({"mlflow__registry_uri": "http://127.0.0.1:5001"}, "mlflow.registry_uri"),
    ({"paths__checkpoints__base_path": "hdfs://nn/ckpts"}, "paths.checkpoints.base_path"),
    ({"paths__checkpoints__base_path": "file://data/ckpts"}, "paths.checkpoints.base_path"),
    ({"paths__checkpoints__keep_last": -1}, "paths.checkpoints.keep_last"),
    ({"paths__checkpoints__save_interval": 0}, "paths.checkpoints.save_interval"),
    ({"paths__checkpoints__save_final": "yes"}, "paths.checkpoints.save_final"),
    ({"mlflow__tracking_uri": "localhost:5000", "mlflow__registry_uri": None}, "mlflow.tracking_uri"),
    ({"paths__checkpoints": None}, "paths.checkpoints"),
])
def test_what_cannot_be_mapped_is_refused_naming_the_key(tmp_path, capsys, change, key):
    source = write(tmp_path, trainer("s3://ml-team/ckpts", **change))
    out_file = tmp_path / "ckptkit.yaml"
    code, out, err = run(capsys, "migrate-config", source, "-o", str(out_file))
    assert code == 1 and out == ""
    assert err.startswith(f"ckptkit: error: {source}: {key}: "), err
    assert "backends." not in err.split(":")[2], "the trainer's key, not the generated one, comes first"
    assert not out_file.exists()


def test_without_save_final_there_is_no_final_role_and_mlflow_is_unused(tmp_path, capsys):
    source = write(tmp_path, trainer("./ckpts", paths__checkpoints__save_final=False,
                                     paths__checkpoints__keep_last=None))
    code, out, err = run(capsys, "migrate-config", source, "-o", str(tmp_path / "c.yaml"))
    assert code == 0, err
    config = Config.from_file(str(tmp_path / "c.yaml"))
    assert config.final is None and list(config.backends) == ["checkpoints"]
    out = flat(out)
    assert "The mlflow section is not used" in out
    assert "not given: ckptkit's default, the newest 3 checkpoints stay" in out


def test_out_is_not_overwritten_without_force(tmp_path, capsys):
    source = write(tmp_path, trainer("./ckpts"))
    out_file = tmp_path / "c.yaml"
    out_file.write_text("mine")
    code, _, err = run(capsys, "migrate-config", source, "-o", str(out_file))
    assert code == 1 and "exists; pass --force" in err and out_file.read_text() == "mine"
    code, _, err = run(capsys, "migrate-config", source, "-o", str(out_file), "--force")
    assert code == 0 and Config.from_file(str(out_file)).resume.keep_last == 5


def test_credentials_in_the_tracking_uri_stay_out_of_the_explanation(tmp_path, capsys):
    uri = "http://alice:s3cr3t@127.0.0.1:5000"
    source = write(tmp_path, trainer("./ckpts", mlflow__tracking_uri=uri, mlflow__registry_uri=uri))
    code, out, err = run(capsys, "migrate-config", source, "-o", str(tmp_path / "c.yaml"))
    assert code == 0, err
    assert "s3cr3t" not in out and "MLFLOW_TRACKING_PASSWORD" in flat(out)
    assert Config.from_file(str(tmp_path / "c.yaml")).backends["registry"].options["tracking_uri"] == uri


def test_a_trainer_config_whose_aliases_stand_for_billions_of_values_is_refused(tmp_path, capsys):
    from test_config import _LAUGHS

    path = tmp_path / "trainer.yaml"
    path.write_text(f"trainer:\n  callbacks:\n{_LAUGHS}")
    assert main(["migrate-config", str(path)]) != 0
    assert "holds more than 100000 values once its YAML aliases" in capsys.readouterr().err
