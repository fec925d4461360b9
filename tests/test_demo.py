"""`ckptkit demo` as a new user sees it: run as a command in a fresh folder, its output read as text."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

pytest.importorskip("ckptkit_mlflow", reason="the default demo publishes to MLflow (the dev venv installs it)")

# A line that MLflow's logging (or alembic's, under it) would print: "2026/12/04 14:24:22 INFO mlflow...".
LOG_LINE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING) |\b(INFO|DEBUG) (mlflow|alembic)\b",
                      re.MULTILINE)


def _demo(cwd, *args, **extra_env):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_LOGGING_LEVEL", "MLFLOW_TRACKING_URI")}
    env["COLUMNS"] = "80"
    env.update(extra_env)
    return subprocess.run([sys.executable, "-m", "ckptkit.cli", "demo", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def default_demo(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("demo")
    return cwd, _demo(cwd, "--steps", "30")


def test_the_demo_says_what_it_did_without_mlflow_log_lines(default_demo):
    cwd, done = default_demo
    assert done.returncode == 0, done.stdout + done.stderr
    assert not LOG_LINE.search(done.stdout + done.stderr), done.stdout + done.stderr
    assert "Creating initial MLflow database tables" not in done.stdout + done.stderr
    assert done.stderr == ""
    for phase in ("trained a reference run of 30 steps", "trained steps 0-18, 2 resume checkpoints saved",
                  "simulated crash", "restarted: restored step 10", "trained steps 11-29",
                  "published the final model to registry"):
        assert phase in done.stdout
    assert "bit-identical to the uninterrupted run" in done.stdout


def test_the_demo_gives_sizes_in_units_and_says_what_tracked_bytes_are(default_demo):
    _, done = default_demo
    out = done.stdout
    assert re.search(r"│ tracked bytes +│ \d+(\.\d)? KB +│", out), out
    assert re.search(r"│ if every checkpoint were logged +│ \d+(\.\d)? KB, \d+x as much", out), out
    assert re.search(r"about \d+(\.\d)? KB each", out)
    assert "Tracked bytes are what the final backends" in out
    assert not re.search(r"\d\.\d{5,}", out), "a number is not rounded"
    assert re.search(r"│ final loss +│ \d\.\d{4} +│", out)


def test_the_demo_names_the_model_version_and_the_command_that_shows_it(default_demo):
    cwd, done = default_demo
    out = done.stdout
    assert re.search(r"│ final model +│ ckptkit_demo_mlp v1 +│", out), out
    assert re.search(r"│ MLflow run +│ [0-9a-f]{32} +│", out), out
    assert "models:/" not in out and "['" not in out
    db = cwd / "ckptkit-demo" / "mlflow.db"
    assert db.is_file()
    assert f"mlflow ui --backend-store-uri sqlite:///{db}\n" in out
    assert "http://127.0.0.1:5000/#/models/ckptkit_demo_mlp/versions/1" in out


def test_the_demo_leaves_its_config_for_the_cli_and_names_the_commands_to_try(default_demo):
    """Nothing named a config for what the demo made, so the CLI could not be tried on it."""
    from ckptkit.cli import main

    cwd, done = default_demo
    written = cwd / "ckptkit-demo" / "ckptkit.yaml"
    out = " ".join(done.stdout.split())
    assert ("Its config is ckptkit-demo/ckptkit.yaml; try the CLI on what it made: ckptkit ls "
            "ckptkit-demo/ckptkit.yaml") in out, out
    assert main(["verify", str(written), "--json"]) == 0
    assert main(["export", str(written), "--out", str(cwd / "model.pt")]) == 0
    assert torch.load(cwd / "model.pt", weights_only=True)["step"] == 20  # the newest resume checkpoint


def test_the_demo_without_an_mlflow_backend_publishes_to_a_folder_and_names_the_extra(tmp_path):
    # No plugin loaded is what a plain `pip install ckptkit` gives the demo.
    done = _demo(tmp_path, "--steps", "20", CKPTKIT_DISABLE_PLUGIN_AUTOLOAD="1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert os.path.isfile(tmp_path / "ckptkit-demo" / "final" / "demo" / "final" / "final_model.pt")
    out = " ".join(done.stdout.split())
    assert 'unset CKPTKIT_DISABLE_PLUGIN_AUTOLOAD' in out and 'pip install -c constraints.txt ".[mlflow]" ./plugins/ckptkit-mlflow' in out
    assert "mlflow ui" not in done.stdout


def test_the_demo_runs_against_a_config_of_the_users(tmp_path):
    config = {"backends": {"scratch": {"type": "local", "path": "./ck"}, "kept": {"type": "local", "path": "./final"}},
              "roles": {"resume": {"backends": ["scratch"], "every_n_steps": 1000, "keep_last": 7},
                        "final": {"backends": ["kept"]}}}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(config))
    done = _demo(tmp_path, "--config", "mine.yaml", "--steps", "20", "--publish")
    assert done.returncode == 0, done.stdout + done.stderr
    run = re.search(r"run '(ckptkit-demo-\d{8}-\d{6})'", done.stdout).group(1)
    # The config's backends, under the demo's own run and schedule (a save every 10 steps).
    assert sorted(os.listdir(tmp_path / "ck" / run)) == ["step-0000000000", "step-0000000010"]
    assert os.path.isfile(tmp_path / "final" / run / "final" / "final_model.pt")
    assert "bit-identical to the uninterrupted run" in done.stdout
    assert "mlflow ui" not in done.stdout and not LOG_LINE.search(done.stdout + done.stderr)
    assert f"ckptkit prune mine.yaml --run-name {run} --all" in done.stdout
    assert sorted(os.listdir(tmp_path)) == ["ck", "final", "mine.yaml"]


def test_the_demo_on_a_config_of_the_users_publishes_nothing_unless_asked(tmp_path):
    """On a team's config, the demo registered its toy model as the newest version of the team's
    registered model, and said nothing of it."""
    config = {"backends": {"scratch": {"type": "local", "path": "./ck"}, "kept": {"type": "local", "path": "./final"}},
              "roles": {"resume": {"backends": ["scratch"], "every_n_steps": 1000, "keep_last": 7},
                        "final": {"backends": ["kept"]}}}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(config))
    done = _demo(tmp_path, "--config", "mine.yaml", "--steps", "20")
    assert done.returncode == 0, done.stdout + done.stderr
    said = " ".join(done.stdout.split())
    assert "no final model published" in said and "add --publish" in said
    assert "warning" not in done.stderr, done.stderr
    assert sorted(os.listdir(tmp_path)) == ["ck", "mine.yaml"]


def test_the_demo_refuses_a_config_without_a_resume_role(tmp_path):
    (tmp_path / "final-only.yaml").write_text("backends: {kept: {type: local, path: ./final}}\n"
                                              "roles: {final: {backends: [kept]}}\n")
    done = _demo(tmp_path, "--config", "final-only.yaml")
    assert done.returncode == 1
    assert done.stderr.startswith("ckptkit: error: final-only.yaml: roles.resume: the demo needs a resume backend")
    assert os.listdir(tmp_path) == ["final-only.yaml"]


def test_a_config_naming_a_backend_type_not_installed_fails_before_any_training(tmp_path):
    (tmp_path / "s3.yaml").write_text("backends: {archive: {type: not-installed, path: s3://b/ck}}\n"
                                      "roles: {resume: {backends: [archive]}}\n")
    done = _demo(tmp_path, "--config", "s3.yaml")
    assert done.returncode == 1
    assert "not-installed" in done.stderr
    assert "reference run" not in done.stdout, "it trained before reading the config through"


def test_publish_without_a_config_is_refused_before_training(tmp_path):
    """--publish applies with --config; alone it was accepted and did nothing of its own."""
    done = _demo(tmp_path, "--publish")
    assert done.returncode == 1 and "--publish applies with --config" in done.stderr, done.stderr
    assert not (tmp_path / "ckptkit-demo").exists()


def test_a_folder_the_demo_cannot_write_is_named_with_what_to_do(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    done = _demo(tmp_path, "--workdir", str(blocked / "demo"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "pass --workdir" in done.stderr and str(blocked / "demo") in done.stderr


def test_a_folder_of_other_files_is_left_untouched_and_the_way_out_named(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    done = _demo(tmp_path, "--workdir", str(precious))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "is not a ckptkit demo folder: nothing in it was touched; give --workdir a new or empty folder" in done.stderr
    assert os.listdir(precious) == ["thesis.tex"]


def test_a_final_backend_that_reports_no_sizes_leaves_tracked_bytes_unknown_not_zero():
    import io

    from rich.console import Console

    from ckptkit.demo import _print_summary

    out = io.StringIO()
    summary = {"tracked_bytes": None, "tracked_bytes_if_every_checkpoint_were_logged": None,
               "resumed_matches_uninterrupted": True, "crashed_after_step": 14, "restored_step": 10, "saves": 3,
               "kept_checkpoints": [10, 20], "resume_bytes_stored": {"scratch": 2048}, "registered_models": [],
               "final_model": ["archive://x/final"], "final_loss": 0.5, "mlflow_run_id": None, "seconds": 1.0,
               "mlflow_ui": [], "registry_missing": False, "config": None, "run_name": "r"}
    _print_summary(Console(file=out, width=120), summary, per_save=1024)
    text = out.getvalue()
    assert "unknown: the final backends report no sizes" in text
    assert "0 B" not in text and "if every checkpoint were logged" not in text
    # A path is shown as it is: rich would read [old] as markup and drop it.
    summary["final_model"] = ["file:///tmp/ck[old]/final"]
    out = io.StringIO()
    _print_summary(Console(file=out, width=120), summary, per_save=1024)
    assert "file:///tmp/ck[old]/final" in out.getvalue()


@pytest.mark.parametrize("autoload", [True, False])
def test_the_hint_for_a_missing_registry_never_sends_pip_to_the_public_index(monkeypatch, autoload):
    """It said pip install "ckptkit[mlflow]", which the public index answers with another
    project's package; with plugins switched off, mlflow may be installed and not loaded."""
    import io

    from rich.console import Console

    from ckptkit.demo import _print_summary

    if autoload:
        monkeypatch.delenv("CKPTKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    else:
        monkeypatch.setenv("CKPTKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    out = io.StringIO()
    summary = {"tracked_bytes": 10, "tracked_bytes_if_every_checkpoint_were_logged": 10,
               "resumed_matches_uninterrupted": True, "crashed_after_step": 14, "restored_step": 10, "saves": 3,
               "kept_checkpoints": [10, 20], "resume_bytes_stored": {"scratch": 2048}, "registered_models": [],
               "final_model": ["file:///x/final"], "final_loss": 0.5, "mlflow_run_id": None, "seconds": 1.0,
               "mlflow_ui": [], "registry_missing": True, "config": None, "run_name": "r"}
    _print_summary(Console(file=out, width=400), summary, per_save=1024)
    text = " ".join(out.getvalue().split())
    assert 'pip install -c constraints.txt ".[mlflow]" ./plugins/ckptkit-mlflow' in text, text
    assert 'pip install --index-url URL "ckptkit[mlflow]"' in text, text
    assert re.search(r'pip install "ckptkit', text) is None, text
    assert ("unset CKPTKIT_DISABLE_PLUGIN_AUTOLOAD" in text) is (not autoload), text


def test_the_tracking_server_to_open_is_shown_without_its_user_part():
    """"open http://***@host:5000" is no address a browser takes; the credentials stay unshown."""
    from types import SimpleNamespace

    from ckptkit.demo import _mlflow_views
    from ckptkit.roles import Role

    ck = SimpleNamespace(
        config=SimpleNamespace(final=True, backends={"registry": SimpleNamespace(type="mlflow")}),
        router=SimpleNamespace(backends=lambda role: ["registry"] if role is Role.FINAL else [],
                               instances={"registry": SimpleNamespace(tracking_uri="http://bob:s3cr3t@127.0.0.1:5000/")}))
    assert _mlflow_views(ck, []) == ["open http://127.0.0.1:5000/"]


def test_an_earlier_demo_folder_is_emptied_only_of_what_the_demo_made(tmp_path):
    """A second ckptkit demo removed the earlier demo's folder whole: notes kept there went with it,
    and nothing said so."""
    from ckptkit.demo import MARKER, _fresh_workdir

    folder = tmp_path / "ckptkit-demo"
    (folder / "checkpoints" / "demo").mkdir(parents=True)
    (folder / MARKER).touch()
    (folder / "mlflow.db").write_text("db")
    (folder / "my-notes").mkdir()
    (folder / "my-notes" / "notes.txt").write_text("kept")
    with pytest.raises(FileExistsError, match=r"holds an earlier demo and files it did not make \(my-notes\): "
                                              r"nothing in it was touched"):
        _fresh_workdir(str(folder))
    assert (folder / "my-notes" / "notes.txt").read_text() == "kept" and (folder / "mlflow.db").exists()
    (folder / "my-notes" / "notes.txt").unlink()
    (folder / "my-notes").rmdir()
    assert _fresh_workdir(str(folder)) == (str(folder), True)
    assert os.listdir(folder) == [MARKER]
    assert _fresh_workdir(str(tmp_path / "new")) == (str(tmp_path / "new"), False)
