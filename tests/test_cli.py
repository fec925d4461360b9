import json
import shutil
import os
import re
import stat
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


def test_backends_with_autoload_off_says_installed_plugins_were_not_loaded(capsys, monkeypatch, cli_columns):
    """Titled "Installed backend types", the list left out every installed plugin without a word."""
    cli_columns(200)
    monkeypatch.setenv("CKPTKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    code, out, _ = run(capsys, "backends")
    assert code == 0 and "local" in out and "s3" not in out.split()
    assert "CKPTKIT_DISABLE_PLUGIN_AUTOLOAD is set: installed plugins were not loaded" in " ".join(out.split())
    monkeypatch.delenv("CKPTKIT_DISABLE_PLUGIN_AUTOLOAD")
    code, out, _ = run(capsys, "backends")
    assert code == 0 and "Installed backend types" in out and "not loaded" not in out


def test_check_shows_routing_and_probes(capsys, config_file, tmp_path):
    code, out, _ = run(capsys, "check", str(config_file), "--json", "--probe")
    data = json.loads(out)
    assert code == 0
    routes = {(r["role"], r["backend"]) for r in data["routes"]}
    resume = next(r for r in data["routes"] if r["role"] == "resume")
    assert set(resume["settings"]) == {"every_n_steps", "keep_last", "format", "async", "async_copy", "keep_best", "write_threads"}
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


def test_check_names_each_final_problem_once(tmp_path):
    cfg = local_config(tmp_path, final=False)
    cfg["backends"]["tracking"] = {"type": "mlflow", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                                   "experiment": "e", "registered_model_name": "model_{algorithm}"}
    cfg["roles"]["final"] = {"backends": ["tracking"]}
    path = tmp_path / "ckptkit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # A real process: what reaches its terminal, the log's last-resort output included.
    proc = subprocess.run([sys.executable, "-m", "ckptkit.cli", "check", str(path)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.count("uses {algorithm}") == 1, proc.stderr
    assert proc.stderr.startswith("ckptkit: error: backend 'tracking': ") and proc.stderr.strip().count("\n") == 0


def test_ckptkit_log_warnings_are_one_line_each_like_the_cli_own(capsys, tmp_path):
    """A warning ckptkit logs (here: a backend no role uses) reaches the terminal as the CLI's own
    warnings do, prefixed and redacted; without a handler Python printed it bare, or not at all
    where logging was set up elsewhere."""
    cfg = local_config(tmp_path, final=False)
    cfg["backends"]["unused"] = {"type": "local", "path": str(tmp_path / "unused")}
    path = tmp_path / "ckptkit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run(capsys, "ls", str(path))
    assert code == 1
    assert "ckptkit: warning: backend 'unused' is declared but no role uses it" in err.splitlines()


def test_a_plugins_log_warnings_are_redacted_lines_too_and_a_bad_record_fails_nothing(capsys, monkeypatch, tmp_path):
    """A plugin logs under its own name (ckptkit_mlflow.backend): its warnings reach the terminal
    as ckptkit's do, with credentials taken out; a record that cannot be formatted is reported by
    logging and the command goes on."""
    import logging

    from ckptkit import cli

    def command(args):
        logging.getLogger("ckptkit_mlflow.backend").warning("run not usable: http://user:s3cr3t@host/api")
        logging.getLogger("ckptkit.manager").warning("bad %d", "x")
        print("went on")
        return 0

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_command(parser(), command))
    monkeypatch.setattr(logging, "raiseExceptions", False)  # as in production: handleError is quiet
    code, out, err = run(capsys, "backends")
    assert code == 0 and out.strip() == "went on"
    assert "ckptkit: warning: run not usable: http://***@host/api" in err.splitlines()
    assert "s3cr3t" not in err


def _with_command(parser, command):
    parser.set_defaults(func=command)
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            sub.set_defaults(func=command)
    return parser


def test_ls_shows_a_checkpoint_saved_without_an_epoch_as_a_dash(capsys, config_file):
    from ckptkit import CheckpointManager

    with CheckpointManager.from_config(str(config_file)) as ck:
        ck.save(step=7, model=make_model()[0])
    code, out, _ = run(capsys, "ls", str(config_file))
    row = next(line for line in out.splitlines() if " 7 " in line)
    assert code == 0 and "None" not in row and " - " in row


def test_with_json_an_error_after_the_output_leaves_stdout_one_document(capsys, config_file, saved, monkeypatch):
    """An error once the command printed its JSON (here: closing the manager fails) goes to stderr
    alone: a second object on stdout would make the whole of it unparseable."""
    from ckptkit import BackendError, CheckpointManager

    def failing_close(self):
        raise BackendError("scratch", "closing failed")

    monkeypatch.setattr(CheckpointManager, "close", failing_close)
    code, out, err = run(capsys, "ls", str(config_file), "--json")
    assert code == 1 and [r["step"] for r in json.loads(out)] == [3, 2, 1, 0]
    assert "ckptkit: error: backend 'scratch': closing failed" in err


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


def test_ls_names_the_folder_pattern_only_for_the_standard_layout(capsys, config_file, saved, third_party_dist,
                                                                   tmp_path):
    code, out, _ = run(capsys, "ls", str(config_file))
    assert code == 0 and f"scratch: file://{saved}/step-NNNNNNNNNN" in out.replace("\n", "")
    from ckptkit import CheckpointManager

    memo = {"backends": {"m": {"type": "memo"}}, "roles": {"resume": {"backends": ["m"], "every_n_steps": 1}},
            "run_name": "exp"}
    with CheckpointManager.from_config(memo) as ck:  # the memo type names its checkpoints memo://m/exp/<step>
        ck.save(step=7, model=make_model()[0])
    other = tmp_path / "memo.yaml"
    other.write_text(yaml.safe_dump(memo))
    code, out, _ = run(capsys, "ls", str(other))
    assert code == 0 and "m: memo://m/exp/7" in out and "NNNN" not in out


def test_prune_names_a_checkpoint_its_store_did_not_deliver_unverified_not_damaged(capsys, tmp_path, third_party_dist):
    """A checkpoint whose manifest the store did not deliver was listed by prune as damaged:
    what is told damaged, users delete, and it may be intact (as verify calls it)."""
    from ckptkit import CheckpointManager

    memo = {"backends": {"m": {"type": "memo"}}, "roles": {"resume": {"backends": ["m"], "every_n_steps": 1}},
            "run_name": "exp"}
    with CheckpointManager.from_config(memo) as ck:
        model, opt = make_model()
        for step in range(3):
            ck.save(step=step, model=model, optimizer=opt)
    memo["backends"]["m"]["unanswered_steps"] = [2]
    config = tmp_path / "memo.yaml"
    config.write_text(yaml.safe_dump(memo))
    code, out, _ = run(capsys, "prune", str(config), "--keep-last", "1", "--json")
    data = json.loads(out)
    assert code == 0 and [(d["step"], d["kind"]) for d in data["damaged"]] == [(2, "unverified")]
    assert "did not answer" in data["damaged"][0]["error"]
    code, out, _ = run(capsys, "prune", str(config), "--keep-last", "1")
    assert "unverified:" in out and "damaged" not in out


def test_prune_all_with_keep_last_is_refused_deleting_nothing(capsys, config_file, saved):
    """"prune --all --keep-last 2", meant as all but two, deleted every step, the newest included."""
    code, _, err = run(capsys, "prune", str(config_file), "--all", "--keep-last", "2")
    assert code == 1 and "--all deletes every checkpoint of the run" in err and "give one of them" in err
    assert sorted(os.listdir(saved)) == [f"step-000000000{i}" for i in range(4)]


def test_ls_leaves_out_damaged_checkpoints_and_says_which(capsys, config_file, saved):
    """ls left out a checkpoint restore would not take without a word: at 3 a.m. the newest step
    seemed to have vanished, and a RunConflictError naming newer steps could not be understood."""
    (saved / "step-0000000003" / "state.pt").write_bytes(b"short")
    (saved / "step-0000000001" / "manifest.json").write_text("{}")
    shutil.copytree(saved / "step-0000000002", saved / "step-0000000008")  # step 2, in the folder of step 8
    code, out, err = run(capsys, "ls", str(config_file), "--json")
    assert code == 0 and [r["step"] for r in json.loads(out)] == [2, 0]
    told = " ".join(err.split())
    assert "warning: 3 checkpoints of the store's listing are not shown" in told, told
    assert "scratch step 3 (its files disagree" in told and "scratch step 1 (" in told
    # Why each is left out, as restore and verify say it, not one guess for all.
    assert "scratch step 8 (" in told and "step 2" in told.split("scratch step 8 (", 1)[1].split(")")[0], told
    assert "ckptkit verify" in told


def test_a_checkpoint_of_a_newer_ckptkit_is_named_by_ls_verify_and_prune_and_kept(capsys, config_file, saved):
    manifest = saved / "step-0000000003" / "manifest.json"
    later = re.sub(rb'"ckptkit_version": "[^"]*"', b'"ckptkit_version": "99.0.0"', manifest.read_bytes())
    manifest.write_bytes(later.replace(b'"version": 2', b'"version": 3'))
    code, out, err = run(capsys, "ls", str(config_file), "--json")
    assert [r["step"] for r in json.loads(out)] == [2, 1, 0]
    assert "warning: " in err and "step-0000000003/manifest.json was written by a newer ckptkit" in err
    code, out, err = run(capsys, "verify", str(config_file), "--json")
    assert code == 1 and [r["result"] for r in json.loads(out)] == ["newer", "ok", "ok", "ok"]
    assert "1 of 4 checkpoints were written by a newer ckptkit" in err and "CORRUPT" not in err
    code, out, _ = run(capsys, "prune", str(config_file), "--keep-last", "1", "--json")
    data = json.loads(out)
    assert code == 0 and [(d["step"], d["kind"]) for d in data["damaged"]] == [(3, "newer ckptkit")]
    assert sorted(r["step"] for r in data["deleted"]) == [0, 1]
    assert sorted(os.listdir(saved)) == ["step-0000000002", "step-0000000003"]


def test_ls_hides_a_manifest_that_says_another_step_than_its_folder(capsys, config_file, saved):
    """ls showed step 9 for the manifest of step-0000000003 edited to say so; restore refused it."""
    manifest = saved / "step-0000000003" / "manifest.json"
    data = json.loads(manifest.read_bytes())
    data.pop("checksum")
    data.update(version=1, step=9)
    manifest.write_text(json.dumps(data))  # an unsealed (version 1) manifest: nothing else to forge
    code, out, _ = run(capsys, "ls", str(config_file), "--json")
    assert code == 0 and [r["step"] for r in json.loads(out)] == [2, 1, 0]


def test_prune_dry_run_then_for_real(capsys, config_file, saved):
    code, out, _ = run(capsys, "prune", str(config_file), "--keep-last", "1", "--dry-run", "--json")
    data = json.loads(out)
    assert code == 0 and sorted(r["step"] for r in data["deleted"]) == [0, 1, 2]
    assert len(os.listdir(saved)) == 4
    run(capsys, "prune", str(config_file), "--keep-last", "1")
    assert os.listdir(saved) == ["step-0000000003"]


def test_prune_with_nothing_to_delete_says_so_instead_of_an_empty_table(capsys, config_file, saved):
    code, out, _ = run(capsys, "prune", str(config_file), "--keep-last", "10", "--dry-run")
    assert code == 0 and "nothing to delete (keep_last=10)" in out and "backend" not in out
    assert len(os.listdir(saved)) == 4


def test_prune_keep_last_zero_is_refused_not_replaced_by_config(capsys, config_file, saved):
    code, _, err = run(capsys, "prune", str(config_file), "--keep-last", "0")
    assert code == 1 and "--keep-last must be at least 1" in err
    assert len(os.listdir(saved)) == 4


@pytest.mark.parametrize("step", [[], ["--step", "1"]])
def test_export_into_a_checkpoint_it_would_damage_is_refused(capsys, config_file, saved, step):
    """--out at a checkpoint's state.pt replaced it, and that checkpoint then failed verification."""
    target = saved / "step-0000000003" / "state.pt"
    before = target.read_bytes()
    code, _, err = run(capsys, "export", str(config_file), "--out", str(target), *step)
    assert code == 1 and "lies inside checkpoint folder" in err and "step-0000000003" in err
    assert target.read_bytes() == before
    assert run(capsys, "verify", str(config_file))[0] == 0


@pytest.mark.parametrize("where", ["exp/final/model.pt", "other-run/step-0000000001/state.pt"])
def test_export_into_the_final_model_or_another_runs_checkpoint_is_refused(capsys, config_file, saved, where):
    (saved.parent / where).parent.mkdir(parents=True, exist_ok=True)
    code, _, err = run(capsys, "export", str(config_file), "--out", str(saved.parent / where))
    assert code == 1 and "lies inside checkpoint folder" in err
    assert not (saved.parent / where).exists()
    code, _, _ = run(capsys, "export", str(config_file), "--out", str(saved / "model.pt"))
    assert code == 0, "the run's own folder holds no checkpoint files"


def test_export_to_a_bad_path_exits_1_with_one_line(capsys, config_file, saved, tmp_path):
    for out in (str(tmp_path / "missing" / "model.pt"), str(tmp_path)):
        code, _, err = run(capsys, "export", str(config_file), "--out", out)
        assert code == 1 and err.startswith("ckptkit: error: --out") and err.strip().count("\n") == 0


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 KiB filesystem (a tmpfs; mounting needs root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()}")
    yield mount
    # Lazily: a file a failed export left open must not leave the mount behind.
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_an_export_that_fails_halfway_leaves_the_file_that_was_there(capsys, tmp_path, small_disk):
    """export wrote straight onto --out: stopped halfway (Ctrl-C, a full disk), it left a good
    earlier export cut short under its name, which torch.load then refused."""
    from ckptkit import CheckpointManager

    cfg = local_config(tmp_path)
    ck = CheckpointManager.from_config(cfg)
    import torch

    ck.save(step=1, model=torch.nn.Linear(4, 4))
    ck.save(step=2, model=torch.nn.Linear(256, 256), force=True)  # 256 KiB: more than the disk holds
    ck.close()
    config = tmp_path / "ckptkit.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = small_disk / "model.pt"
    code, _, _ = run(capsys, "export", str(config), "--out", str(out), "--step", "1")
    assert code == 0
    good = out.read_bytes()
    code, _, err = run(capsys, "export", str(config), "--out", str(out), "--step", "2")
    assert code == 1 and f"--out: {out} exists; pass --force to replace it" in err
    assert out.read_bytes() == good
    code, _, err = run(capsys, "export", str(config), "--out", str(out), "--step", "2", "--force")
    assert code == 1 and err.startswith("ckptkit: error:")
    assert out.read_bytes() == good
    assert torch.load(out, weights_only=True)["step"] == 1
    assert os.listdir(small_disk) == ["model.pt"]  # no temporary file left beside it


def test_a_skipped_checkpoint_is_one_warning_line_without_python_source(capsys, config_file, saved, tmp_path):
    (saved / "step-0000000003" / "state.pt").write_bytes(b"short")
    code, _, err = run(capsys, "export", str(config_file), "--out", str(tmp_path / "m.pt"))
    assert code == 0
    warning = [line for line in err.splitlines() if line.strip()]
    assert len(warning) == 1 and warning[0].startswith("ckptkit: warning: skipped ") and "step-0000000003" in warning[0]
    code, out, _ = run(capsys, "verify", str(config_file), "--json")
    assert "4 files" not in out  # one file each (no extra): said in the singular
    assert all(r["detail"].startswith("1 file,") for r in json.loads(out) if r["ok"])


def test_demo_too_few_steps_exits_1_with_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "demo", "--workdir", str(tmp_path / "d"), "--steps", "3")
    assert code == 1 and err.startswith("ckptkit: error:") and "at least" in err


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


# -- --json: an error is one object on stdout ------------------------------------------------------

def _json_error(out):
    data = json.loads(out)
    assert set(data) == {"error"} and set(data["error"]) == {"type", "message"}, data
    return data["error"]


@pytest.mark.parametrize("argv", [
    ("ls",), ("verify",), ("check",), ("check", "--probe"), ("prune",), ("prune", "--all"),
    ("export", "--out", "m.pt"), ("publish",), ("plan", "--state-size", "1GB", "--steps", "10"),
])
def test_with_json_a_config_error_is_one_object_on_stdout(capsys, tmp_path, argv):
    missing = tmp_path / "nosuch.yaml"
    code, out, err = run(capsys, argv[0], str(missing), *argv[1:], "--json")
    assert code == 1
    assert _json_error(out) == {"type": "ConfigError", "message": f"{missing}: config file not found"}
    assert err.startswith("ckptkit: error: ")  # the line for a person stays on stderr


def test_with_json_a_bad_argument_is_one_object_on_stdout(capsys, tmp_path, config_file):
    code, out, _ = run(capsys, "demo", "--workdir", str(tmp_path / "d"), "--steps", "3", "--json")
    error = _json_error(out)
    assert code == 1 and error["type"] == "CkptkitError" and "at least" in error["message"]
    with pytest.raises(SystemExit) as exited:
        main(["plan", str(config_file), "--json"])
    out, err = capsys.readouterr()
    error = _json_error(out)
    assert exited.value.code == 2 and error["type"] == "UsageError"
    assert "the following arguments are required: --state-size, --steps" in error["message"]
    assert "usage: ckptkit plan" in err


def test_with_json_an_error_holds_no_credentials(capsys, config_file, monkeypatch):
    code, out, _ = run(capsys, "ls", str(config_file), "--run-name", "alice:hunter2@mlflow.internal:5000", "--json")
    assert code == 1 and "hunter2" not in out and "***@mlflow.internal" in _json_error(out)["message"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY")
    code, out, _ = run(capsys, "verify", str(config_file), "--run-name", "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY/x",
                       "--json")
    assert code == 1 and "EXAMPLEKEY" not in out and "<redacted>" in _json_error(out)["message"]


# -- a store that cannot be listed, installed as a real distribution -----------------------------

_DOWN = "from ckpt_helpers import DownBackend\n"


def _install(tmp_path, monkeypatch, type_name: str, module: str, source: str, cls: str) -> None:
    """Install backend type ``type_name`` as a real distribution (``module``'s ``cls``) on sys.path."""
    site = tmp_path / "site"
    info = site / f"{module}-1.0.dist-info"
    info.mkdir(parents=True)
    (site / f"{module}.py").write_text(source)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[ckptkit.backends]\n{type_name} = {module}:{cls}\n")
    monkeypatch.syspath_prepend(str(site))


@pytest.fixture
def down_type(tmp_path, monkeypatch):
    """The backend type ``down``: the local backend over a filesystem whose listings are refused."""
    _install(tmp_path, monkeypatch, "down", "ckptkit_down_cli", _DOWN, "DownBackend")
    yield
    sys.modules.pop("ckptkit_down_cli", None)


def _with_down(tmp_path, resume):
    cfg = local_config(tmp_path, keep=10, final=False)
    cfg["backends"]["nas"] = {"type": "down", "path": str(tmp_path / "nas")}
    cfg["roles"]["resume"]["backends"] = resume
    path = tmp_path / "down.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_ls_exits_1_when_a_backend_cannot_be_listed_and_shows_what_the_others_hold(capsys, saved, tmp_path,
                                                                                   down_type):
    code, out, err = run(capsys, "ls", _with_down(tmp_path, ["scratch", "nas"]), "--json")
    assert code == 1
    assert [r["step"] for r in json.loads(out)] == [3, 2, 1, 0]
    assert err.startswith("ckptkit: error: backend 'nas': could not list") and err.strip().count("\n") == 0
    assert "Connection refused" in err and "the other backends" in err


@pytest.mark.parametrize("every", [False, True], ids=["keep-last", "all"])
@pytest.mark.parametrize("order", [["nas", "scratch"], ["scratch", "nas"]])
def test_prune_with_a_backend_that_cannot_be_listed_prunes_the_others_and_shows_what_went(capsys, saved, tmp_path,
                                                                                         down_type, order, every):
    """The others were pruned, or not, by where the failing backend stood in the config's list,
    and what they lost was not shown: only the failing backend's error."""
    code, out, err = run(capsys, "prune", _with_down(tmp_path, order), *(["--all"] if every else ["--keep-last", "2"]),
                         "--json")
    told = json.loads(out)
    assert code == 1
    gone = [3, 2, 1, 0] if every else [1, 0]
    assert sorted((r["backend"], r["step"]) for r in told["deleted"] if r["step"] is not None) == \
        sorted(("scratch", s) for s in gone)
    assert list(told["failed"]) == ["nas"] and "Connection refused" in told["failed"]["nas"]
    assert sorted(os.listdir(saved)) == ([] if every else ["step-0000000002", "step-0000000003"])
    assert err.startswith("ckptkit: error: backend 'nas': could not list") and err.count("backend 'nas'") == 1, err


def test_a_backend_that_cannot_be_listed_is_named_once(capsys, tmp_path, down_type):
    for command in ("ls", "verify", "prune"):
        code, _, err = run(capsys, command, _with_down(tmp_path, ["nas"]))
        assert code == 1 and "Connection refused" in err
        assert err.count("backend 'nas'") == 1, err


@pytest.mark.parametrize("command", ["ls", "verify", "prune"])
def test_with_json_a_backend_that_cannot_be_listed_is_one_object_on_stdout(capsys, tmp_path, down_type, command):
    code, out, _ = run(capsys, command, _with_down(tmp_path, ["nas"]), "--json")
    error = _json_error(out)
    assert code == 1 and error["type"] == "StorageUnavailableError"
    assert error["message"].startswith("backend 'nas': ") and "Connection refused" in error["message"]


def test_a_failing_backend_is_named_once_in_the_log(tmp_path, third_party_dist, caplog):
    from ckptkit import CheckpointManager, SaveError

    cfg = local_config(tmp_path, final=False)
    cfg["backends"]["memo"] = {"type": "memo", "fail": True}
    cfg["roles"]["resume"]["backends"] = ["scratch", "memo"]
    model, opt = make_model()
    with CheckpointManager.from_config(cfg) as ck, pytest.raises(SaveError) as info:
        ck.save(step=0, model=model, optimizer=opt)
    logged = [r.getMessage() for r in caplog.records if "memo store is down" in r.getMessage()]
    assert logged and all(m.count("backend 'memo'") == 1 for m in logged), logged
    assert "(memo: ConnectionError: memo store is down)" in str(info.value)


@pytest.mark.parametrize("typo", ["lcoal", "LOCAL", "Local"])
def test_an_unknown_backend_type_gets_a_did_you_mean(capsys, tmp_path, typo):
    bad = tmp_path / "typo.yaml"
    bad.write_text(f"backends: {{a: {{type: {typo}, path: x}}}}\nroles: {{resume: {{backends: [a]}}}}\n")
    code, _, err = run(capsys, "check", str(bad))
    assert code == 1 and f"unknown backend type '{typo}'" in err and "did you mean 'local'?" in err


# -- 80 columns -----------------------------------------------------------------------------------

@pytest.fixture
def narrow(cli_columns):
    """The command line's consoles as they start on an 80-column terminal."""
    return cli_columns(80)


def _readable(out, width, *whole):
    lines = out.splitlines()
    assert lines and max(len(line) for line in lines) <= width, out
    assert "…" not in out, out  # nothing cut off
    for text in whole:
        assert any(text in line for line in lines), f"{text!r} is split or missing:\n{out}"


def test_tables_stay_readable_at_80_columns(capsys, config_file, saved, tmp_path, narrow):
    code, out, _ = run(capsys, "ls", str(config_file))
    assert code == 0
    table, folder = out.rstrip("\n").rsplit("\n", 1)
    _readable(table, narrow, "KiB", "loss: 0.25", "loss: 0.3333")
    assert re.search(r"│ \d{4}-\d\d-\d\d \d\d:\d\d +│", table)
    # The folder, whole on its own line (a terminal may wrap it; rich does not break it).
    assert folder == f"scratch: file://{saved}/step-NNNNNNNNNN"
    code, out, _ = run(capsys, "check", str(config_file), "--probe")
    assert code == 0
    _readable(out, narrow, "every_n_steps=1", "keep_last=10", "config OK")
    code, out, _ = run(capsys, "backends")
    _readable(out, narrow, "ckptkit.local.LocalBackend")
    code, out, _ = run(capsys, "verify", str(config_file))
    _readable(out, narrow, "ok")
    code, out, _ = run(capsys, "prune", str(config_file), "--keep-last", "1", "--dry-run")
    _readable(out, narrow, "would delete")
    plan = tmp_path / "plan.yaml"
    plan.write_text("backends:\n  scratch: {type: local, path: ./ck}\n  archive: {type: s3, path: s3://ckpts/p}\n"
                    "  registry: {type: mlflow}\nroles:\n  resume: {backends: [scratch], every_n_steps: 1000, "
                    "keep_last: 5}\n  final: {backends: [archive, registry]}\n")
    code, out, _ = run(capsys, "plan", str(plan), "--state-size", "14GB", "--steps", "30000")
    assert code == 0
    _readable(out, narrow, "duplicate", "420 GB", "newest 5 of 30", "registry")


def test_check_probe_leaves_nothing_in_the_working_directory(capsys, in_tmp, monkeypatch):
    # The README's shape: relative local roots and MLflow's embedded default store.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (in_tmp / "ckptkit.yaml").write_text(
        "backends:\n  scratch: {type: local, path: ./checkpoints/nested}\n  registry: {type: mlflow}\n"
        "roles:\n  resume: {backends: [scratch]}\n  final: {backends: [registry]}\n")
    code, out, err = run(capsys, "check", "ckptkit.yaml", "--probe", "--json")
    routes = {r["backend"]: r["probe"] for r in json.loads(out)["routes"]}
    assert code == 0, err
    assert routes["scratch"] == {"write": "ok", "list": "ok", "read": "ok", "delete": "ok"}
    assert routes["registry"] and all(v == "ok" for v in routes["registry"].values())
    assert sorted(os.listdir(in_tmp)) == ["ckptkit.yaml"]


def test_check_probe_on_a_full_disk_says_so_and_leaves_nothing(capsys, in_tmp, tiny_disk):
    """The probe's write made its file, then ran out of space: the file stayed, one a probe, and
    the advice was to check the address and credentials."""
    with open(tiny_disk / "filler", "wb") as f, pytest.raises(OSError):
        while True:
            f.write(b"x" * 65536)
            f.flush()
    (in_tmp / "ckptkit.yaml").write_text(f"backends:\n  scratch: {{type: local, path: {tiny_disk}}}\n"
                                         "roles:\n  resume: {backends: [scratch]}\n")
    code, out, err = run(capsys, "check", "ckptkit.yaml", "--probe", "--json")
    probe = {r["backend"]: r["probe"] for r in json.loads(out)["routes"]}["scratch"]
    assert code != 0 and "No space left on device" in probe["write"], probe
    assert "the filesystem is full: free space there" in probe["write"] and "free space" in err
    assert sorted(os.listdir(tiny_disk)) == ["filler"], "the probe's file is gone"


def test_check_probe_keeps_a_root_that_was_there(capsys, in_tmp):
    (in_tmp / "checkpoints").mkdir()
    (in_tmp / "ckptkit.yaml").write_text("backends:\n  scratch: {type: local, path: ./checkpoints}\n"
                                         "roles:\n  resume: {backends: [scratch]}\n")
    assert run(capsys, "check", "ckptkit.yaml", "--probe")[0] == 0
    assert sorted(os.listdir(in_tmp)) == ["checkpoints", "ckptkit.yaml"] and not os.listdir(in_tmp / "checkpoints")


def test_mlflow_info_lines_are_kept_out_but_its_warnings_show(capsys, monkeypatch):
    import logging

    pytest.importorskip("mlflow")  # configures its loggers on import, as in a real command
    from ckptkit.cli import _quiet_mlflow

    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    log = logging.getLogger("mlflow.store.db.utils")
    before = logging.getLogger("mlflow").level
    with _quiet_mlflow():
        log.info("Creating initial MLflow database tables...")
        log.warning("the tracking store is read-only")
    err = capsys.readouterr().err
    assert "Creating initial" not in err and "the tracking store is read-only" in err
    assert logging.getLogger("mlflow").level == before and "MLFLOW_LOGGING_LEVEL" not in os.environ


def test_ctrl_c_ends_a_command_with_one_line_and_status_130(tmp_path):
    """An interrupted command (here the demo, training) is the user's own stop, not a crash."""
    import signal
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "ckptkit.cli", "demo", "--workdir", str(tmp_path / "demo"), "--steps", "1000000"]
    # SIGINT as a terminal gives it: a test run started in the background of a shell without job
    # control ignores SIGINT, and its children inherit that (Python then raises nothing).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline(), "the demo said nothing before training"  # started: main() runs
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"the demo went on after Ctrl-C; what it wrote to stderr: {err[-3000:]}")
    finally:
        proc.kill()
    # 130, or ended by the SIGINT itself (Python may re-raise it at exit, where a library saw the
    # interrupt too): a shell's $? is 130 either way.
    assert proc.returncode in (130, -signal.SIGINT), err[-3000:]
    assert "Traceback" not in err and "ckptkit: interrupted" in err


def test_ls_of_a_run_with_no_checkpoint_fails_as_verify_does(capsys, config_file, tmp_path):
    """Saying where it looked: a relative path in a config is relative to where ckptkit runs."""
    root = f"file://{tmp_path / 'scratch'}"
    for command in ("ls", "verify"):
        code, out, err = run(capsys, command, str(config_file), "--run-name", "never-saved")
        assert code == 1 and out == ""
        assert err == (f"ckptkit: error: run 'never-saved' has no committed checkpoint in resume backend scratch "
                       f"({root}, a folder that does not exist)\n")
        code, out, _ = run(capsys, command, str(config_file), "--run-name", "never-saved", "--json")
        assert code == 1 and json.loads(out)["error"]["type"] == "CheckpointNotFoundError"


def test_ls_without_run_name_says_where_the_run_name_came_from(capsys, tmp_path, config_file):
    code, _, err = run(capsys, "ls", str(config_file))
    assert code == 1 and "run 'exp' (the config's run_name; pass --run-name for another run) has no" in err
    cfg = local_config(tmp_path, final=False)
    del cfg["run_name"]
    config_file.write_text(yaml.safe_dump(cfg))
    code, _, err = run(capsys, "ls", str(config_file))
    assert code == 1 and "run 'default' (the default run name, as the config sets no run_name" in err


def test_ls_of_a_run_on_one_backend_of_two_lists_it_and_names_the_empty_one(capsys, tmp_path, saved):
    cfg = local_config(tmp_path, keep=10, final=False)
    cfg["backends"]["nas"] = {"type": "local", "path": str(tmp_path / "nas")}
    cfg["roles"]["resume"]["backends"] = ["scratch", "nas"]
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out, err = run(capsys, "ls", str(path))
    assert code == 0 and err == ""
    assert "nas: no checkpoint of run 'exp'" in out and "scratch: file://" in out


def test_ls_of_a_run_whose_checkpoints_are_all_damaged_fails_and_says_so(capsys, config_file, saved):
    for step in range(4):
        (saved / f"step-{step:010d}" / "state.pt").write_bytes(b"short")
    code, out, err = run(capsys, "ls", str(config_file), "--json")
    error = json.loads(out)["error"]
    assert code == 1 and error["type"] == "CheckpointError"
    assert error["message"] == (f"run 'exp' has no checkpoint that can be listed in resume backend scratch "
                                f"(file://{saved.parent}): 4 committed are damaged or written by a newer "
                                "ckptkit; ckptkit verify says which")


def test_ls_json_is_strict_json_with_a_nan_metric(capsys, config_file):
    import json as _json

    from ckptkit import CheckpointManager
    from ckpt_helpers import make_model

    model, opt = make_model()
    with CheckpointManager.from_config(str(config_file)) as ck:
        ck.save(step=1, model=model, optimizer=opt, metrics={"loss": float("nan"), "best": float("inf")})
    assert main(["ls", str(config_file), "--json"]) == 0

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    rows = _json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert rows[0]["metrics"] == {"loss": "nan", "best": "inf"}


def test_verify_checks_a_trainers_own_pt_file_without_loading_it(capsys, config_file, tmp_path):
    from ckptkit import CheckpointManager

    src = tmp_path / "trainer_out"
    src.mkdir()
    (src / "optimizer.pt").write_bytes(b"not a torch file: the trainer's own format")
    with CheckpointManager.from_config(str(config_file)) as ck:
        ck.save_files(step=3, files=src)
    assert main(["verify", str(config_file)]) == 0, capsys.readouterr()


def test_tables_show_brackets_in_names_and_paths_as_they_are(capsys, tmp_path, cli_columns):
    """rich reads [word] as markup: a metric acc[top5] or a folder ck[old] lost its brackets."""
    from ckptkit import CheckpointManager

    cli_columns(200)
    cfg = local_config(tmp_path, final=False)
    cfg["backends"]["scratch"]["path"] = str(tmp_path / "ck[old]")
    config = tmp_path / "ckptkit.yaml"
    config.write_text(yaml.safe_dump(cfg))
    with CheckpointManager.from_config(str(config)) as ck:
        model, opt = make_model()
        ck.save(step=1, model=model, optimizer=opt, metrics={"acc[top5]": 0.5, "loss[red]": 0.25})
    code, out, _ = run(capsys, "ls", str(config))
    assert code == 0 and "acc[top5]: 0.5" in out and "loss[red]: 0.25" in out
    code, out, _ = run(capsys, "check", str(config))
    assert code == 0 and "ck[old]" in out


@pytest.mark.parametrize("command", [["verify"], ["export", "--out", "m.pt"]])
def test_a_store_that_cannot_be_listed_gives_advice_for_the_command_not_for_a_restore(capsys, tmp_path, down_type,
                                                                                    command):
    """verify and export train nothing: "starting from step 0 could throw away training" and
    "remove the backend from roles.resume.backends" were a restore's advice."""
    cfg = _with_down(tmp_path, ["nas"])
    code, _, err = run(capsys, command[0], cfg, *[str(tmp_path / c) if c.endswith(".pt") else c for c in command[1:]])
    assert code == 1 and "could not be listed" in err and "Connection refused" in err
    assert "Try again once the storage answers" in err
    assert "step 0" not in err and "roles.resume.backends" not in err


def test_publish_from_a_final_store_that_cannot_be_read_says_so_not_that_none_is_stored(capsys, tmp_path, down_type):
    """publish took a final backend it could not list for one holding no final model: "no stored
    final model ... publish a resume checkpoint with --step" while one may lie there."""
    cfg = local_config(tmp_path, final=False)
    cfg["backends"]["nas"] = {"type": "down", "path": str(tmp_path / "nas")}
    cfg["roles"]["final"] = {"backends": ["nas"]}
    path = tmp_path / "down.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run(capsys, "publish", str(path), "--fallback-dir", str(tmp_path / "fallback"))
    assert code == 1
    said = " ".join(err.split())
    assert "no stored final model was found, as these final backends could not be read: nas:" in said
    assert "Connection refused" in said and "try again once they answer" in said


def test_publish_with_one_final_store_unread_publishes_nothing_as_the_newest_found_may_not_be_the_newest(
        capsys, tmp_path, down_type):
    """The store that did not answer may hold a newer final model (a later finalize's): the one
    found would follow it in a registry as the newest version."""
    from ckptkit import CheckpointManager

    cfg = local_config(tmp_path, final=False)
    cfg["backends"]["kept"] = {"type": "local", "path": str(tmp_path / "kept")}
    cfg["roles"]["final"] = {"backends": ["kept"]}
    with CheckpointManager.from_config(cfg) as ck:
        ck.finalize(model=make_model()[0], step=3)
    cfg["backends"]["nas"] = {"type": "down", "path": str(tmp_path / "nas")}
    cfg["roles"]["final"] = {"backends": ["kept", "nas"]}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run(capsys, "publish", str(path), "--fallback-dir", str(tmp_path / "fallback"))
    said = " ".join(err.split())
    assert code == 1
    assert "the newest final model found (step 3) may not be the newest, as these final backends could not be " \
           "read: nas: " in said and "Connection refused" in said
    assert "Nothing was published" in said and "--step STEP, or a folder with --from" in said
    assert sorted(p.name for p in (tmp_path / "kept" / "exp").iterdir()) == ["final"]


def test_publish_to_a_backend_not_in_the_config_names_it_before_looking_for_a_model(capsys, tmp_path):
    """Without --step, a misnamed --backend was hidden behind "no stored final model"."""
    cfg = local_config(tmp_path, final=True)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run(capsys, "publish", str(path), "--backend", "nope", "--fallback-dir", str(tmp_path / "fb"))
    assert code == 1 and "nope: not a final backend of this config (final backends: published)" in err, err


def test_publish_never_replaces_a_final_model_of_a_newer_ckptkit_with_an_older_one(capsys, tmp_path):
    """A final model a newer ckptkit wrote was passed over as damaged: publish then sent the older
    one from the fallback folder into that very backend, replacing it."""
    from ckptkit import CheckpointManager

    cfg = local_config(tmp_path, final=False)
    cfg["backends"]["published"] = {"type": "local", "path": str(tmp_path / "published")}
    cfg["roles"]["final"] = {"backends": ["published"]}
    with CheckpointManager.from_config(cfg) as ck:
        ck.finalize(model=make_model()[0], step=9)
    fallback = {**cfg, "backends": {**cfg["backends"], "published": {"type": "local", "path": str(tmp_path / "fb")}}}
    with CheckpointManager.from_config(fallback) as ck:
        ck.finalize(model=make_model()[0], step=3)  # an older final model, where publish looks as well
    manifest = tmp_path / "published" / "exp" / "final" / "manifest.json"
    later = re.sub(rb'"ckptkit_version": "[^"]*"', b'"ckptkit_version": "99.0.0"', manifest.read_bytes())
    manifest.write_bytes(later.replace(b'"version": 2', b'"version": 3'))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run(capsys, "publish", str(path), "--fallback-dir", str(tmp_path / "fb" / "exp" / ".."))
    assert code == 1 and "written by a newer ckptkit" in err
    assert manifest.read_bytes() == later.replace(b'"version": 2', b'"version": 3')


_BUGGY = """
import ckptkit
from ckptkit.local import LocalBackend


class BuggyBackend(LocalBackend):
    @ckptkit.hookimpl
    def read_manifest(self, ref):
        raise KeyError("region")
"""


def test_verify_tells_a_plugins_failure_from_a_damaged_checkpoint(capsys, saved, tmp_path, monkeypatch):
    """A plugin's KeyError reading manifests had every checkpoint reported CORRUPT, which users
    delete: they are unverified, the plugin named."""
    _install(tmp_path, monkeypatch, "buggy", "ckptkit_buggy_cli", _BUGGY, "BuggyBackend")
    cfg = local_config(tmp_path, keep=10, final=False)
    cfg["backends"]["scratch"]["type"] = "buggy"
    path = tmp_path / "buggy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    try:
        code, out, err = run(capsys, "verify", str(path), "--json")
    finally:
        sys.modules.pop("ckptkit_buggy_cli", None)
    rows = json.loads(out)
    assert code == 1 and [r["result"] for r in rows] == ["plugin"] * 4
    assert "read_manifest (type 'buggy', from ckptkit-buggy-cli 1.0) raised KeyError: 'region'" in rows[0]["detail"]
    assert "failed verification" not in err and "their backend's plugin failed" in err


_PRUNED_MEANWHILE = """
import os, shutil
import ckptkit
from ckptkit.local import LocalBackend


class PrunedMeanwhile(LocalBackend):
    \"\"\"Step 1 is deleted, as a training's prune deletes it, once it has been listed.\"\"\"

    @ckptkit.hookimpl
    def read_manifest(self, ref):
        if ref.step == 1 and os.environ.get("PRUNE_STEP_1") == "1":
            os.remove(os.path.join(ref.local_dir, "manifest.json"))  # a prune deletes the manifest first
        return super().read_manifest(ref=ref)
"""


@pytest.mark.parametrize("pruned", [True, False])
def test_verify_does_not_call_a_checkpoint_pruned_while_it_was_read_corrupt(capsys, saved, tmp_path, monkeypatch,
                                                                          pruned):
    """A check from cron beside a training: a checkpoint its prune deleted between the listing and
    the reads was reported CORRUPT, and the command failed. A checkpoint still listed whose
    manifest cannot be read is still damaged."""
    _install(tmp_path, monkeypatch, "pruning", "ckptkit_pruning_cli", _PRUNED_MEANWHILE, "PrunedMeanwhile")
    monkeypatch.setenv("PRUNE_STEP_1", "1")
    cfg = local_config(tmp_path, keep=10, final=False)
    cfg["backends"]["scratch"]["type"] = "pruning"
    path = tmp_path / "pruning.yaml"
    path.write_text(yaml.safe_dump(cfg))
    if not pruned:  # damaged in place: the manifest is there, and unreadable
        (saved / "step-0000000001" / "manifest.json").write_text("{")
        monkeypatch.setenv("PRUNE_STEP_1", "0")
    try:
        code, out, err = run(capsys, "verify", str(path), "--json")
    finally:
        sys.modules.pop("ckptkit_pruning_cli", None)
    rows = {r["step"]: r for r in json.loads(out)}
    assert [rows[s]["result"] for s in (3, 2, 0)] == ["ok"] * 3
    if pruned:
        assert code == 0, err
        assert rows[1]["result"] == "gone" and "deleted while it was being verified" in rows[1]["detail"]
        assert "failed verification" not in err
    else:
        assert code == 1 and rows[1]["result"] == "corrupt"
        assert "1 of 4 checkpoints failed verification" in err


def test_path_options_expand_the_home_folder_and_an_export_is_as_readable_as_any_file(capsys, config_file, saved,
                                                                                     tmp_path, monkeypatch):
    """--out=~/m.pt reaches ckptkit with the ~ (the shell expands it only at a word's start):
    it wrote ./~/m.pt, a folder named ~ that rm -rf ~ would take the home folder with. And the
    exported file was 0600 (a temporary file's mode), unreadable to the team it was made for."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        code, _, err = run(capsys, "export", str(config_file), "--out=~/model.pt")
    finally:
        os.umask(old)
    assert code == 0, err
    assert (home / "model.pt").is_file() and not (tmp_path / "~").exists()
    assert stat.S_IMODE((home / "model.pt").stat().st_mode) == 0o644
    (home / "model.pt").chmod(0o640)  # a replaced file keeps the mode it was given
    code, _, err = run(capsys, "export", str(config_file), "--out", str(home / "model.pt"), "--force")
    assert code == 0, err
    assert stat.S_IMODE((home / "model.pt").stat().st_mode) == 0o640
    assert [p.name for p in home.iterdir()] == ["model.pt"]  # no temporary file left


def test_prune_run_from_another_folder_says_where_it_looked(capsys, tmp_path, monkeypatch):
    """A config with a relative path, run from another folder: prune said "nothing to delete"
    as for an empty run, where ls and verify named the folder that does not exist."""
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "run_name": "r", "backends": {"scratch": {"type": "local", "path": "./ckpts"}},
        "roles": {"resume": {"backends": ["scratch"], "every_n_steps": 1, "keep_last": 2}}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, _ = run(capsys, "prune", str(tmp_path / "c.yaml"))
    squeezed = "".join(out.split())  # rich wraps the line where it likes
    assert code == 0 and "".join(f"nothing to delete (keep_last=2) in scratch (file://{elsewhere}/ckpts, a folder "
                                 "that does not exist)".split()) in squeezed, out


def test_python_m_ckptkit_is_the_ckptkit_command():
    """Where the console script is not on the PATH (a venv not activated), ``python -m ckptkit``
    said "No module named ckptkit.__main__"."""
    proc = subprocess.run([sys.executable, "-m", "ckptkit", "backends", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "local" in [row["type"] for row in json.loads(proc.stdout)]


@pytest.mark.parametrize("command", ["verify", "export", "publish"])
def test_a_step_below_zero_is_refused_as_an_option_not_a_traceback(capsys, config_file, command):
    """export and publish printed a ValueError's traceback for --step -1 (and nothing on stdout
    with --json)."""
    extra = ["--out", "m.pt"] if command == "export" else []
    with pytest.raises(SystemExit) as exit_:
        main([command, str(config_file), "--step", "-1", *extra])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert f"ckptkit {command}: error: argument --step: a step is a whole number from 0 up, not '-1'" in err
    assert "Traceback" not in err
