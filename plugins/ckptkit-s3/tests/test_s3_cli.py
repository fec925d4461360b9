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


def _two_stores_saved(tmp_path, s3_backend_options, proxy):
    import torch

    from ckptkit import CheckpointManager

    # The steps are saved straight to the store (a loaded machine may be slow to pass them on);
    # the CLI is told the store behind the proxy, whose faults the tests add. Its timeout is
    # 5 s: the faults are answers (503), given at once.
    archive = s3_backend_options(request_retries=0, timeout_s=5)
    archive["retry"] = {"attempts": 1}
    cfg = {"run_name": "verified", "backends": {"scratch": {"type": "local", "path": str(tmp_path / "scratch")},
                                                "archive": archive},
           "roles": {"resume": {"backends": ["scratch", "archive"], "every_n_steps": 1, "keep_last": 2}}}
    ck = CheckpointManager.from_config(cfg)
    model = torch.nn.Linear(4, 4)
    for step in (1, 2):
        ck.save(step=step, model=model)
    ck.close()
    archive["storage_options"] = {**archive["storage_options"], "endpoint_url": proxy.url}
    path = tmp_path / "ckptkit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_verify_calls_checkpoints_a_store_did_not_answer_for_unverified_not_corrupt(
        tmp_path, s3_backend_options, make_fault_proxy, moto_port, capsys):
    """Told CORRUPT, users delete checkpoints; a store that answers 503 says nothing of their bytes."""
    proxy = make_fault_proxy(moto_port)
    config = _two_stores_saved(tmp_path, s3_backend_options, proxy)
    FaultT = type(proxy).__init__.__globals__["Fault"]
    proxy.add(FaultT(lambda m, p: m == "GET" and p.split("?")[0].endswith("/state.pt"), times=None))
    assert main(["verify", config, "--json"]) == 1
    out, err = capsys.readouterr()
    results = {(r["backend"], r["step"]): r["result"] for r in json.loads(out)}
    assert results == {("scratch", 2): "ok", ("scratch", 1): "ok",
                       ("archive", 2): "unverified", ("archive", 1): "unverified"}
    assert "2 of 4 checkpoints could not be read, the storage did not answer" in err
    assert "failed verification" not in err
    assert main(["verify", config]) == 1
    assert "CORRUPT" not in capsys.readouterr().out


def test_verify_fails_when_a_resume_store_cannot_be_listed(tmp_path, s3_backend_options, make_fault_proxy,
                                                          moto_port, capsys):
    """A check run from cron must not pass while one of the stores it checks cannot be seen."""
    proxy = make_fault_proxy(moto_port)
    config = _two_stores_saved(tmp_path, s3_backend_options, proxy)
    FaultT = type(proxy).__init__.__globals__["Fault"]
    proxy.add(FaultT(lambda m, p: m == "GET" and "list-type" in p, times=None))
    assert main(["verify", config, "--json"]) == 1
    out, err = capsys.readouterr()
    assert {(r["backend"], r["result"]) for r in json.loads(out)} == {("scratch", "ok")}
    assert "archive" in err and "its checkpoints were not verified" in err
