"""mkdocs hooks: the config and command-line reference pages, generated from the code at build time.

The config reference walks the attrs classes of ``ckptkit.config`` from ``Config`` down. Each
field's description is the comment block right above it in the class body, so a field added
without one, or one that is not a config key, is a warning, and ``mkdocs build --strict`` fails.
The command-line reference walks the parser of ``ckptkit.cli.build_parser``, so every subcommand
and option registered there appears. Pages that are not in the nav are appended to it, so that a
page someone adds is reachable without editing mkdocs.yml.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import os
import re
import textwrap
import types
import typing
from typing import Any, Iterator

import attrs
from mkdocs.plugins import get_plugin_logger
from mkdocs.structure.files import File

log = get_plugin_logger("ckptkit")

CONFIG_PAGE = "reference/config.md"
CLI_PAGE = "reference/cli.md"

# Fields that hold something other than a config key. Any other field must match a key in its
# class's KEYS, or the reference reports it: a new field needs a key or an entry here.
NOT_KEYS = {("Config", "source")}
# BackendSpec has no KEYS: its name is the mapping key, its options every key besides ``type``.
BACKEND_KEYS = {"name": "<name>", "type": "type", "options": "<option>"}


# -- the config reference ---------------------------------------------------------------------

def field_docs(cls: type) -> dict[str, str]:
    """Each annotated field of ``cls`` and the comment block right above it ('' when none)."""
    lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    (node,) = ast.parse("\n".join(lines)).body
    docs = {}
    for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            above, i = [], item.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#"):
                above.insert(0, lines[i].strip()[1:].strip())
                i -= 1
            docs[item.target.id] = " ".join(above)
    return docs


def _markdown(text: str) -> str:
    return re.sub(r"``(.+?)``", r"`\1`", text).replace("|", r"\|")


def _attrs_classes(tp: Any) -> list[type]:
    """The attrs classes a field's type holds: ``X``, ``X | None``, ``dict[str, X]``."""
    if attrs.has(tp):
        return [tp]
    return [c for arg in typing.get_args(tp) for c in _attrs_classes(arg)]


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (tuple, list):
        return f"list of {_type_name(args[0])}s"
    if origin is dict or attrs.has(tp):
        return "mapping"
    if tp is Any:
        return "any"
    return {int: "integer", float: "number", bool: "boolean", str: "string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _default(field: attrs.Attribute) -> str:
    default = field.default
    if default is attrs.NOTHING:
        return "required"
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        default = default.factory()
    if attrs.has(type(default)):
        return "see below"
    if default is None or default == {}:
        return "none"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    return f"`{default}`"


@attrs.define
class Section:
    key: str                      # the dotted key of the mapping ('' for the top level)
    cls: type
    rows: list[tuple[str, str, str, str]] = attrs.Factory(list)   # key, type, default, meaning


def config_sections(root: type, problems: list[str]) -> list[Section]:
    """The sections of the reference, top level first; what cannot be documented goes to ``problems``."""
    sections: list[Section] = []

    def walk(cls: type, prefix: str) -> None:
        section = Section(prefix, cls)
        sections.append(section)
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        keys = getattr(cls, "KEYS", None)
        covered = set()
        nested = []
        for field in attrs.fields(cls):
            where = f"{cls.__module__}.{cls.__qualname__}.{field.name}"
            if (cls.__name__, field.name) in NOT_KEYS:
                continue
            if keys is None:
                key = BACKEND_KEYS.get(field.name)
                if key is None:
                    problems.append(f"{where}: a field of a class without KEYS; the reference cannot name its key")
                    continue
            elif field.name.rstrip("_") in keys:
                key = field.name.rstrip("_")
            elif "roles" in keys and field.name in ("resume", "final", "best"):
                key = f"roles.{field.name}"
            else:
                problems.append(f"{where}: not a key in {cls.__qualname__}.KEYS; add the key, or add "
                                f"({cls.__name__!r}, {field.name!r}) to NOT_KEYS in docs/hooks.py")
                continue
            covered.add(key.split(".")[0])
            doc = docs.get(field.name, "")
            if not doc:
                problems.append(f"{where}: no description; write it as a comment right above the field")
            full = f"{prefix}.{key}" if prefix else key
            if key == "<name>":
                full = prefix
            tp = hints[field.name]
            inner = _attrs_classes(tp)
            if inner and key not in ("<name>", "<option>"):
                child = f"{full}.<name>" if typing.get_origin(tp) is dict else full
                doc += f" See [`{child}`](#{_section_anchor(child)})."
                nested.append((inner[0], child))
            if key == "<option>":
                section.rows.append((full, "depends on the type", "-",
                                     _markdown(doc) + " See [Backend types](#backend-types)."))
                continue
            section.rows.append((full, _type_name(tp), _default(field), _markdown(doc)))
        for key in keys or ():
            if key not in covered:
                problems.append(f"{cls.__qualname__}.KEYS: {key!r} has no field")
        for child_cls, child_prefix in nested:
            walk(child_cls, child_prefix)

    walk(root, "")
    return sections


def _anchor(key: str) -> str:
    return "key-" + re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")


def _section_anchor(key: str) -> str:
    return "section-" + _anchor(key)[4:]


def _intro(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return _markdown(doc.split("\n\n")[0].replace("\n", " ")) if cls.__doc__ else ""


def backend_types_markdown() -> str:
    """The installed backend types and the option keys each one reads."""
    from ckptkit.plugins import make_plugin_manager

    pm = make_plugin_manager()
    out = ["## Backend types", "",
           "The options a `backends.<name>` entry takes besides `type` depend on its type. The types "
           "installed where these pages were built, and the keys each one reads (the "
           "[configuration guide](../config.md) explains them):", "",
           "| type | distribution | roles | option keys |", "|---|---|---|---|"]
    for t in sorted(pm.backend_types.values(), key=lambda t: t.name):
        options = getattr(t.cls, "OPTIONS", None) or getattr(t.cls, "KEYS", None)
        keys = ", ".join(f"`{k}`" for k in options) if options else "not declared"
        roles = ", ".join(r.value for r in t.roles) or "-"
        out.append(f"| `{t.name}` | {t.dist} | {roles} | {keys} |")
    return "\n".join(out) + "\n"


def config_reference() -> tuple[str, list[str]]:
    """The config reference page and the problems found while writing it."""
    from ckptkit.config import Config

    problems: list[str] = []
    sections = config_sections(Config, problems)
    out = ["# Config reference", "",
           "Every key ckptkit's config reads, generated from the classes in `ckptkit/config.py` when "
           "these pages are built: the type and default come from each field, the meaning from the "
           "comment above it. The [configuration guide](../config.md) explains the keys with "
           "examples and the errors a mistake gives.", ""]
    for s in sections:
        title = f"`{s.key}` {{ #{_section_anchor(s.key)} }}" if s.key else "Top level"
        out += [f"## {title}", ""]
        if s.key and _intro(s.cls):
            out += [_intro(s.cls), ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key, tp, default, meaning in s.rows:
            out.append(f'| <a id="{_anchor(key)}"></a>`{key}` | {tp} | {default} | {meaning} |')
        out.append("")
    out.append(backend_types_markdown())
    return "\n".join(out), problems


# -- the command-line reference ---------------------------------------------------------------

def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """Each subcommand of ``parser``: its name, its help and its parser (aliases once)."""
    seen = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    yield name, helps.get(name, sub.description or ""), sub


def _usage(parser: argparse.ArgumentParser) -> str:
    fmt = argparse.HelpFormatter(parser.prog, width=88)
    fmt.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return fmt.format_help().strip()


def _arguments(parser: argparse.ArgumentParser) -> list[str]:
    fmt = argparse.HelpFormatter(parser.prog)
    rows = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.option_strings:
            name = ", ".join(action.option_strings)
            if action.nargs != 0:
                name += f" {fmt._metavar_formatter(action, action.dest.upper())(1)[0]}"
        else:
            name = fmt._metavar_formatter(action, action.dest)(1)[0]
        meaning = fmt._expand_help(action) if action.help else ""
        extra = []
        if action.choices and not isinstance(action.choices, dict):
            extra.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
        if action.required and action.option_strings:
            extra.append("required")
        if extra:
            meaning += f" ({'; '.join(extra)})"
        rows.append(f"| `{name}` | {_markdown(meaning)} |")
    return (["| argument | meaning |", "|---|---|"] + rows) if rows else []


def cli_sections(parser: argparse.ArgumentParser, level: int = 2) -> list[str]:
    out = []
    for name, help, sub in _subcommands(parser):
        out += [f"{'#' * level} `{sub.prog}`", "", _markdown(help), "", "```", _usage(sub), "```", ""]
        out += _arguments(sub) + [""]
        out += cli_sections(sub, level + 1)
    return out


def cli_reference(parser: argparse.ArgumentParser | None = None) -> str:
    if parser is None:
        from ckptkit.cli import build_parser

        parser = build_parser()
    out = [f"# Command line reference", "",
           f"Generated from the argument parser of `{parser.prog}` when these pages are built. Every "
           "command takes `-h`/`--help`; failures exit 1 with a one-line reason.", "",
           "```", _usage(parser), "```", ""]
    if parser.description:
        out += [_markdown(parser.description), ""]
    out += _arguments(parser) + [""]
    out += cli_sections(parser)
    return "\n".join(out)


# -- mkdocs events ----------------------------------------------------------------------------

def _nav_pages(nav: Any) -> Iterator[str]:
    if isinstance(nav, str):
        yield nav
    elif isinstance(nav, dict):
        for v in nav.values():
            yield from _nav_pages(v)
    elif isinstance(nav, list):
        for v in nav:
            yield from _nav_pages(v)


def on_config(config: Any) -> Any:
    """Append to the nav any page that it does not list, so a page someone adds is reachable."""
    if not config.nav:
        return config
    listed = set(_nav_pages(config.nav)) | {CONFIG_PAGE, CLI_PAGE}
    docs_dir = config.docs_dir
    unlisted = sorted(
        os.path.relpath(os.path.join(d, f), docs_dir).replace(os.sep, "/")
        for d, _, files in os.walk(docs_dir) for f in files if f.endswith(".md")
    )
    unlisted = [p for p in unlisted if p not in listed]
    if unlisted:
        log.info("pages not in the nav, appended under 'More': %s", ", ".join(unlisted))
        config.nav.append({"More": unlisted})
    return config


def on_files(files: Any, config: Any) -> Any:
    """Add the generated reference pages; a field the config reference cannot document is a warning."""
    page, problems = config_reference()
    for problem in problems:
        log.warning("config reference: %s", problem)
    files.append(File.generated(config, CONFIG_PAGE, content=page))
    files.append(File.generated(config, CLI_PAGE, content=cli_reference()))
    return files
