"""``ckptkit check --probe`` and ``ckptkit ls`` on an S3 backend, through the command line."""

import json

import yaml

from ckptkit.cli import main


def test_check_probe_reports_write_list_read_delete(tmp_path, s3_backend_options, capsys, s3_endpoint):
    cfg = {"backends": {"archive": s3_backend_options()}, "roles": {"resume": {"backends": ["archive"]}}}
    path = tmp_path / "ckptkit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["check", str(path), "--probe", "--json"]) == 0
    route = json.loads(capsys.readouterr().out)["routes"][0]
    assert route["backend"] == "archive" and route["location"].startswith("s3://")
    assert route["probe"] == {"write": "ok", "list": "ok", "read": "ok", "delete": "ok"}


def test_check_probe_fails_for_a_missing_bucket(tmp_path, s3_backend_options, capsys):
    options = s3_backend_options()
    options["path"] = "s3://no-such-bucket-here/ckpts"
    options["retry"] = {"attempts": 1}
    cfg = {"backends": {"archive": options}, "roles": {"resume": {"backends": ["archive"]}}}
    path = tmp_path / "ckptkit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["check", str(path), "--probe", "--json"]) == 1
    out, err = capsys.readouterr()
    probe = json.loads(out)["routes"][0]["probe"]
    assert probe["write"] != "ok"
    assert "probe failed for archive" in err
    assert "wJalrXUtnFEMI" not in out + err, "the secret key must never be printed"
