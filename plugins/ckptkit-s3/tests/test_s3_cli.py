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
    cfg = {"backends": {"archive": options},
           "roles": {"resume": {"backends": ["archive"]}, "final": {"backends": ["archive"]}}}
    path = tmp_path / "ckptkit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["check", str(path), "--probe", "--json"]) == 1
    out, err = capsys.readouterr()
    report = json.loads(out)
    probe = report["routes"][0]["probe"]
    assert probe["write"] != "ok"
    # Nothing written: the rest is not asked for, and the backend of both roles is probed once.
    assert {probe[op] for op in ("list", "read", "delete")} == {"not tried (the write failed)"}
    assert report["routes"][1]["probe"] == probe
    assert any("probe failed for archive:" in p for p in report["problems"])
    assert "probe failed for archive:" in err and "archive, archive" not in err
    assert main(["check", str(path), "--probe"]) == 1
    assert "config OK" not in capsys.readouterr().out
    assert "wJalrXUtnFEMI" not in out + err, "the secret key must never be printed"
