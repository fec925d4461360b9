"""The docs site builds with warnings as errors, and its generated references cover the code."""

from __future__ import annotations

import argparse
import html
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import attrs
import pytest

from ckptkit.cli import build_parser
from ckptkit.config import Config

REPO = Path(__file__).resolve().parents[1]
# mkdocs-material prints a banner about MkDocs 2.0 on every build unless this is set.
ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}


def _load_hooks() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("ckptkit_docs_hooks", REPO / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _load_hooks()


def _build(config_file: Path, site: Path, cwd: Path, env: dict[str, str] = ENV) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config_file), "-d", str(site)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = _build(REPO / "mkdocs.yml", out / "site", cwd=out)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr[-6000:]}"
    return out / "site"


def _page(site: Path, name: str) -> str:
    return (site / name / "index.html").read_text(encoding="utf-8")


def test_the_strict_build_writes_every_page(site: Path) -> None:
    for page in ("architecture", "config", "guarantees", "plugins", "install", "quickstart", "migrate", "reference/config", "reference/cli"):
        assert (site / page / "index.html").is_file(), page
    assert "ckptkit" in (site / "index.html").read_text(encoding="utf-8")
    # The diagrams reach the page as mermaid blocks for the browser to draw.
    architecture = _page(site, "architecture")
    assert architecture.count('class="mermaid"') >= 2
    assert "sequenceDiagram" in architecture


def _config_fields(cls: type) -> typing.Iterator[tuple[type, attrs.Attribute]]:
    """Every attrs field reachable from ``cls``, walked independently of the docs generator."""
    seen = set()

    def walk(c: type) -> typing.Iterator[tuple[type, attrs.Attribute]]:
        if c in seen:
            return
        seen.add(c)
        hints = typing.get_type_hints(c)
        for field in attrs.fields(c):
            yield c, field
            for inner in hooks._attrs_classes(hints[field.name]):
                yield from walk(inner)

    yield from walk(cls)


def test_every_config_field_is_in_the_built_reference(site: Path) -> None:
    raw = _page(site, "reference/config")
    page = html.unescape(raw)
    documented = {html.unescape(k) for k in re.findall(r"<code>([^<]+)</code></td>", raw)}
    leaves = {key.rsplit(".", 1)[-1] for key in documented}
    fields = list(_config_fields(Config))
    assert len(fields) >= 15
    for cls, field in fields:
        if (cls.__name__, field.name) in hooks.NOT_KEYS:
            continue
        leaf = hooks.BACKEND_KEYS[field.name] if cls.__name__ == "BackendSpec" else field.name.rstrip("_")
        assert leaf in leaves, f"{cls.__qualname__}.{field.name} is missing from the config reference"
    assert "roles.resume.keep_best.metric" in documented
    # Each row says what the key means, from the comment above its field.
    assert "step % every_n_steps == 0" in page


@attrs.frozen
class _Leaf:
    """A section of a made-up config."""

    # Documented.
    size: int = 1
    colour: str = "red"

    KEYS = ("size", "colour")


@attrs.frozen
class _Root:
    # Documented too.
    leaf: _Leaf = _Leaf()
    # A field that is no key.
    stray: int = 0

    KEYS = ("leaf", "missing")


def test_an_undocumented_field_or_key_is_reported() -> None:
    problems: list[str] = []
    sections = hooks.config_sections(_Root, problems)
    assert [s.key for s in sections] == ["", "leaf"]
    assert any("_Leaf.colour: no description" in p for p in problems), problems
    assert any("_Root.stray: not a key" in p for p in problems), problems
    assert any("'missing' has no field" in p for p in problems), problems
    assert not any("size" in p for p in problems)


def test_the_strict_build_fails_on_an_undocumented_field_and_a_broken_anchor(tmp_path: Path) -> None:
    """A copy of the docs and the package: one new config field without a comment, one page with
    a link to an anchor that does not exist; both must stop the build."""
    shutil.copytree(REPO / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(REPO / "src" / "ckptkit", tmp_path / "src" / "ckptkit", ignore=shutil.ignore_patterns("__pycache__"))
    config_py = tmp_path / "src" / "ckptkit" / "config.py"
    text = config_py.read_text()
    # A new key in Config's KEYS and a field for it, with no comment above the field.
    text, n = re.subn(r'(\nclass Config:.*?\n)(    KEYS = \()', r'\1    retention_days: int = 30\n\n\2"retention_days", ',
                      text, count=1, flags=re.S)
    assert n == 1
    config_py.write_text(text)
    (tmp_path / "docs" / "extra.md").write_text("# Extra\n\nSee [the roles](architecture.md#no-such-anchor).\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path / "src"), ENV.get("PYTHONPATH", "")])}
    proc = _build(tmp_path / "mkdocs.yml", tmp_path / "site", cwd=tmp_path, env=env)
    assert proc.returncode != 0
    assert "Config.retention_days: no description" in proc.stderr, proc.stderr[-4000:]
    assert "no-such-anchor" in proc.stderr, proc.stderr[-4000:]
    # The page is not in the nav: it was appended, not reported.
    assert not re.search(r"WARNING.*\bnav\b", proc.stderr), proc.stderr[-4000:]


def _commands(parser: argparse.ArgumentParser) -> typing.Iterator[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub
                yield from _commands(sub)


def test_the_cli_reference_lists_every_command_and_option(site: Path) -> None:
    page = html.unescape(_page(site, "reference/cli"))
    commands = list(_commands(build_parser()))
    assert len(commands) >= 9
    for sub in commands:
        assert f"<code>{sub.prog}</code>" in page, sub.prog
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for option in action.option_strings:
                assert option in page, f"{sub.prog} {option}"
            if action.help and action.help != argparse.SUPPRESS:
                assert action.help.split("%(")[0][:40] in page, f"{sub.prog} {action.dest}"


def test_a_command_added_to_the_parser_appears_in_the_cli_reference() -> None:
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    p = subparsers.add_parser("frobnicate", help="frobnicate a run's checkpoints")
    p.add_argument("--widget", choices=("a", "b"), required=True, help="which widget")
    page = hooks.cli_reference(parser)
    assert "## `ckptkit frobnicate`" in page
    assert "frobnicate a run's checkpoints" in page
    assert "| `--widget {a,b}` | which widget (one of `a`, `b`; required) |" in page


def test_a_page_missing_from_the_nav_is_appended(tmp_path: Path) -> None:
    (tmp_path / "index.md").write_text("# Home\n")
    (tmp_path / "new.md").write_text("# New\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.md").write_text("# Deep\n")
    config = types.SimpleNamespace(nav=[{"Home": "index.md"}], docs_dir=str(tmp_path))
    hooks.on_config(config)
    assert config.nav == [{"Home": "index.md"}, {"More": ["new.md", "sub/deep.md"]}]
