"""ckptkit plan: bytes per role and backend, routed against duplicate uploads to MLflow."""

from __future__ import annotations

import json

import pytest

from ckptkit.cli import main
from ckptkit.config import Config
from ckptkit.errors import ConfigError
from ckptkit.plan import format_size, make_plan, parse_size

GB = 10**9


def _config(final=("registry",), extra_backends=None, every=1000, keep=5):
    backends = {"scratch": {"type": "local", "path": "/tmp/ckptkit-plan"},
                "registry": {"type": "mlflow"}, **(extra_backends or {})}
    return Config.from_dict({"backends": backends,
                             "roles": {"resume": {"backends": ["scratch"], "every_n_steps": every, "keep_last": keep},
                                       "final": {"backends": list(final)}}})


def test_the_issue_arithmetic_70_gb_against_490_gb_an_86_percent_cut():
    plan = make_plan(_config(), parse_size("14GB"), 30000)
    assert plan.saves == 30
    assert plan.resume_end == 70 * GB
    assert plan.duplicate_resume_end == 490 * GB
    assert round(plan.resume_cut * 100) == 86
    assert plan.resume_cut == pytest.approx(1 - 70 / 490)
    local = next(h for h in plan.routed if h.backend == "scratch")
    assert (local.copies, local.end_bytes, local.peak_bytes) == (5, 70 * GB, 84 * GB)
    logged = next(h for h in plan.duplicate if h.role == "resume" and h.backend == "registry")
    assert (logged.copies, logged.end_bytes) == (30, 420 * GB)
    # The final model: once in MLflow, in both plans.
    assert plan.total_end == 84 * GB and plan.duplicate_total_end == 504 * GB


def test_registry_holds_only_a_uri_when_an_object_store_keeps_the_final_file():
    plan = make_plan(_config(final=("archive", "registry"),
                             extra_backends={"archive": {"type": "s3", "path": "s3://b/p"}}),
                     parse_size("14GB"), 30000, final_size=parse_size("5GB"))
    rows = {(h.role, h.backend): h for h in plan.routed}
    assert rows[("final", "archive")].end_bytes == 5 * GB
    assert rows[("final", "registry")].end_bytes == 0
    assert "archive" in rows[("final", "registry")].note


def test_fewer_saves_than_keep_last_keeps_them_all():
    plan = make_plan(_config(every=5, keep=5), 1000, 30)
    local = plan.routed[0]
    assert plan.saves == 6
    assert (local.copies, local.end_bytes, local.peak_bytes) == (5, 5000, 6000)
    plan = make_plan(_config(every=10, keep=5), 1000, 30)
    assert (plan.saves, plan.routed[0].end_bytes, plan.routed[0].peak_bytes) == (3, 3000, 3000)


@pytest.mark.parametrize("text,expected", [("14GB", 14 * GB), ("14 gb", 14 * GB), ("1.5G", 1_500_000_000),
                                           ("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1000B", 1000),
                                           (1000, 1000)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "14XB", "GB", "-3GB", "0"])
def test_parse_size_rejects_nonsense_naming_the_flag(text):
    with pytest.raises(ConfigError, match="--state-size"):
        parse_size(text)


def test_format_size_uses_decimal_units():
    assert format_size(70 * GB) == "70 GB"
    assert format_size(490 * GB) == "490 GB"
    assert format_size(512) == "512 B"


@pytest.mark.parametrize("n,text", [(999, "999 B"), (999_950, "1 MB"), (47_513, "47.5 KB"), (142_534, "143 KB"),
                                    (11_040, "11 KB"), (1_500_000_000, "1.5 GB"), (5 * 10**15, "5,000 TB")])
def test_format_size_rounds_to_three_digits(n, text):
    assert format_size(n) == text


def test_cli_plan_json(tmp_path, capsys):
    cfg = tmp_path / "ckptkit.yaml"
    cfg.write_text("backends:\n  scratch: {type: local, path: ./ck}\n  registry: {type: mlflow}\n"
                   "roles:\n  resume: {backends: [scratch], every_n_steps: 1000, keep_last: 5}\n"
                   "  final: {backends: [registry]}\n")
    assert main(["plan", str(cfg), "--state-size", "14GB", "--steps", "30000", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["resume_end"] == 70 * GB
    assert data["totals"]["duplicate_resume_end"] == 490 * GB
    assert data["totals"]["resume_cut"] == pytest.approx(0.8571, abs=1e-4)
    assert main(["plan", str(cfg), "--state-size", "14GB", "--steps", "30000"]) == 0
    out = capsys.readouterr().out
    assert "70 GB" in out and "490 GB" in out and "86%" in out


def test_cli_plan_bad_size_exits_1_with_one_line(tmp_path, capsys):
    cfg = tmp_path / "ckptkit.yaml"
    cfg.write_text("backends:\n  scratch: {type: local, path: ./ck}\nroles:\n  resume: {backends: [scratch]}\n")
    assert main(["plan", str(cfg), "--state-size", "lots", "--steps", "10"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ckptkit: error: --state-size") and "\n" not in err


@pytest.mark.parametrize("text", ["14", "1.5", " 14 "])
def test_a_size_without_a_unit_is_refused_naming_the_choices(text):
    with pytest.raises(ConfigError, match=r"--state-size: .* has no unit; write .*GB .*GiB .*B if bytes"):
        parse_size(text)


def test_cli_plan_state_size_without_unit_exits_1_with_one_line(tmp_path, capsys):
    cfg = tmp_path / "ckptkit.yaml"
    cfg.write_text("backends:\n  scratch: {type: local, path: ./ck}\nroles:\n  resume: {backends: [scratch]}\n")
    assert main(["plan", str(cfg), "--state-size", "14", "--steps", "10"]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("ckptkit: error: --state-size: '14' has no unit") and "\n" not in err
    assert "14GB" in err and captured.out == ""


def test_a_cut_short_of_all_is_never_shown_as_100_percent():
    from ckptkit.cli import _share

    assert _share(0.999) == "99.9%" and _share(0.99996) == "99.996%" and _share(0.5) == "50%" and _share(1.0) == "100%"


@pytest.mark.parametrize("backends,named", [
    ("scratch: {type: nosuch, path: ./ck}", "nosuch"),
    ("scratch: {type: mlflow}", "cannot serve the resume role"),
])
def test_cli_plan_refuses_a_config_no_training_could_run(tmp_path, capsys, backends, named):
    """plan read the config's shape only: it planned a type not installed, and MLflow holding the
    last resume checkpoints, which it never prunes, and exited 0 where check and every training
    refuse them."""
    cfg = tmp_path / "ckptkit.yaml"
    cfg.write_text(f"backends:\n  {backends}\nroles:\n  resume: {{backends: [scratch], keep_last: 2}}\n")
    assert main(["plan", str(cfg), "--state-size", "1GB", "--steps", "10", "--json"]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("ckptkit: error:") and named in err and "\n" not in err, err
    assert json.loads(captured.out)["error"]["type"] in ("ConfigError", "PluginError"), captured.out
