import json
import os
import subprocess
import sys

import pytest
import yaml

from ckptkit.cli import main

from ckpt_helpers import local_config, make_model, train_step


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "ckptkit.yaml"
    path.write_text(yaml.safe_dump(local_config(tmp_path, keep=10)))
    return path


@pytest.fixture
def saved(config_file, tmp_path):
    from ckptkit import CheckpointManager

    with CheckpointManager.from_config(str(config_file)) as ck:
        model, opt = make_model()
        for step in range(4):
            train_step(model, opt)
            ck.save(step=step, epoch=0, model=model, optimizer=opt, metrics={"loss": 1.0 / (step + 1)})
    return tmp_path / "scratch/exp"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_backends_lists_types_with_distribution_and_roles(capsys):
    code, out, _ = run(capsys, "backends", "--json")
    rows = {r["type"]: r for r in json.loads(out)}
    assert code == 0
    assert rows["local"]["distribution"].startswith("ckptkit ")
    assert rows["local"]["roles"] == ["resume", "final"]


def test_check_shows_routing_and_probes(capsys, config_file, tmp_path):
    code, out, _ = run(capsys, "check", str(config_file), "--json", "--probe")
    data = json.loads(out)
    assert code == 0
    routes = {(r["role"], r["backend"]) for r in data["routes"]}
    resume = next(r for r in data["routes"] if r["role"] == "resume")
    assert set(resume["settings"]) == {"every_n_steps", "keep_last", "format", "async", "keep_best"}
    assert routes == {("resume", "scratch"), ("final", "published")}
    assert all(v == "ok" for r in data["routes"] for v in r["probe"].values())
    code, out, _ = run(capsys, "check", str(config_file))
    assert code == 0 and "scratch" in out and "config OK" in out


def test_check_bad_config_exits_1_with_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("backends: {a: {type: local, path: x}}\nroles: {resume: {backends: [a], keep_last: 0}}\n")
    code, out, err = run(capsys, "check", str(bad))
    assert code == 1
    assert err.strip().count("\n") == 0
    assert "roles.resume.keep_last" in err and err.startswith("ckptkit: error:")


def test_ls_and_verify(capsys, config_file, saved):
    code, out, _ = run(capsys, "ls", str(config_file), "--json")
    rows = json.loads(out)
    assert code == 0 and [r["step"] for r in rows] == [3, 2, 1, 0]
    assert rows[0]["metrics"] == {"loss": 0.25} and rows[0]["size"] > 0
    assert run(capsys, "verify", str(config_file))[0] == 0

    state = saved / "step-0000000002" / "state.pt"
    data = bytearray(state.read_bytes())
    data[-100] ^= 1
    state.write_bytes(bytes(data))
    code, out, err = run(capsys, "verify", str(config_file), "--json")
    result = {r["step"]: r["ok"] for r in json.loads(out)}
    assert code == 1 and result == {3: True, 2: False, 1: True, 0: True}
    assert "1 of 4 checkpoints failed" in err


def test_ls_hides_checkpoint_whose_files_disagree(capsys, config_file, saved):
    (saved / "step-0000000003" / "state.pt").write_bytes(b"short")
    code, out, _ = run(capsys, "ls", str(config_file), "--json")
    assert [r["step"] for r in json.loads(out)] == [2, 1, 0]


def test_prune_dry_run_then_for_real(capsys, config_file, saved):
    code, out, _ = run(capsys, "prune", str(config_file), "--keep-last", "1", "--dry-run", "--json")
    data = json.loads(out)
    assert code == 0 and sorted(r["step"] for r in data["deleted"]) == [0, 1, 2]
    assert len(os.listdir(saved)) == 4
    run(capsys, "prune", str(config_file), "--keep-last", "1")
    assert os.listdir(saved) == ["step-0000000003"]


def test_prune_keep_last_zero_is_refused_not_replaced_by_config(capsys, config_file, saved):
    code, _, err = run(capsys, "prune", str(config_file), "--keep-last", "0")
    assert code == 1 and "--keep-last must be at least 1" in err
    assert len(os.listdir(saved)) == 4


def test_export_to_a_bad_path_exits_1_with_one_line(capsys, config_file, saved, tmp_path):
    for out in (str(tmp_path / "missing" / "model.pt"), str(tmp_path)):
        code, _, err = run(capsys, "export", str(config_file), "--out", out)
        assert code == 1 and err.startswith("ckptkit: error: --out") and err.strip().count("\n") == 0


def test_demo_too_few_steps_exits_1_with_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "demo", "--workdir", str(tmp_path / "d"), "--steps", "3")
    assert code == 1 and err.startswith("ckptkit: error:") and "at least" in err


def test_verify_of_empty_run_fails(capsys, config_file):
    code, _, err = run(capsys, "verify", str(config_file), "--run-name", "nothing-here")
    assert code == 1 and "no committed checkpoint" in err


def test_demo_resumes_bit_identically(tmp_path, capsys):
    code, out, _ = run(capsys, "demo", "--workdir", str(tmp_path / "demo"), "--steps", "30", "--json")
    summary = json.loads(out)
    assert code == 0
    assert summary["resumed_matches_uninterrupted"] is True
    assert summary["restored_step"] == 10
    assert summary["kept_checkpoints"] == [0, 10, 20]
    assert summary["final_model"]
    assert summary["saves"] == 3
    assert 0 < summary["tracked_bytes"] < summary["tracked_bytes_if_every_checkpoint_were_logged"]


def test_demo_refuses_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("precious")
    code, _, err = run(capsys, "demo", "--workdir", str(tmp_path))
    assert code == 1 and "not a ckptkit demo folder" in err and err.strip().count("\n") == 0
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "ckptkit.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("backends", "check", "ls", "verify", "prune", "demo"):
        assert command in out


def test_errors_reach_the_terminal_without_credentials(capsys, config_file, monkeypatch):
    # A value echoed back in an error (here the run name) may hold user:password@host.
    code, out, err = run(capsys, "ls", str(config_file), "--run-name", "alice:hunter2@mlflow.internal:5000")
    assert code == 1 and "hunter2" not in out + err and "***@mlflow.internal" in err
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY")
    code, out, err = run(capsys, "ls", str(config_file), "--run-name", "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY/x")
    assert code == 1 and "EXAMPLEKEY" not in out + err and "<redacted>" in err
