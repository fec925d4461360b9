"""The ``ckptkit`` command line: inspect backends, check configs, list, verify and prune."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import logging
import os
import re
import sys
import warnings
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator

import attrs
from rich.console import Console
from rich.progress import track
from rich.table import Table
from rich.text import Text

from .checkpoint import CheckpointRef
from .errors import (BackendError, CheckpointError, CheckpointNotFoundError, CkptkitError, PruneError,
                     IncompatibleCheckpointError, LocalWriteError, StorageUnavailableError)
from .manager import CheckpointManager
from .storage import FileBackend
from ._project import DISABLE_AUTOLOAD_ENV
from .plugins import make_plugin_manager
from .redact import redact, secret_values
from .roles import Role

console = Console()
err_console = Console(stderr=True)


def _strict(value: Any) -> Any:
    """``value`` with non-finite floats as the strings manifests use: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def _emit(args: argparse.Namespace, data: Any, table: Table | None) -> None:
    if getattr(args, "json", False):
        print(json.dumps(_strict(data), indent=2, default=str, allow_nan=False))
        args.emitted = True  # stdout holds its one document: a later error goes to stderr alone
    elif table is not None:
        console.print(table)


def _table(title: str, columns: Iterable[str], whole: Iterable[str] = ()) -> Table:
    """A table that stays readable on an 80-column terminal.

    The ``whole`` columns hold short values (names, steps, sizes) that never wrap; the others
    wrap, and fold a word longer than the column, rather than cutting it off with an ellipsis.
    """
    keep = set(whole)
    table = _PlainTable(title=Text(title))
    for col in columns:
        table.add_column(col, no_wrap=col in keep, overflow="fold")
    return table


class _PlainTable(Table):
    """A table whose text cells are shown as they are, never read as rich markup: a metric
    named ``acc[top5]``, a folder ``./ck[old]`` or an error's ``[project.entry-points...]`` lost
    their brackets. A cell that is styled is a ``Text`` already."""

    def add_row(self, *cells: Any, **kwargs: Any) -> None:
        super().add_row(*(Text(c) if isinstance(c, str) else c for c in cells), **kwargs)


def _fail(message: str) -> None:
    err_console.print(f"ckptkit: error: {redact(message, secret_values())}", markup=False, highlight=False,
                      soft_wrap=True)


def _when(created: str) -> str:
    """A manifest's ISO time as ``YYYY-MM-DD HH:MM`` in UTC; the text as it is when it is not one."""
    try:
        moment = datetime.fromisoformat(created)
    except (TypeError, ValueError):
        return str(created)
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M")


def _manager(args: argparse.Namespace) -> CheckpointManager:
    return CheckpointManager.from_config(args.config, run_name=args.run_name)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# -- commands ---------------------------------------------------------------------------------

def cmd_backends(args: argparse.Namespace) -> int:
    pm = make_plugin_manager()
    # A type claimed by two distributions is broken, whichever loaded first: a config using it fails.
    rows = [{"type": t.name, "distribution": t.dist, "roles": [r.value for r in t.roles],
             "class": f"{t.cls.__module__}.{t.cls.__qualname__}"}
            for t in sorted(pm.backend_types.values(), key=lambda t: t.name) if t.name not in pm.broken]
    rows += [{"type": name, "distribution": pm.broken_dists.get(name), "roles": [], "class": None, "error": str(exc)}
             for name, exc in sorted(pm.broken.items())]
    # With autoload off, the installed plugins were not looked for: the title must not say they are all here.
    title = ("Installed backend types" if pm.autoloaded else
             f"Backend types built into ckptkit ({DISABLE_AUTOLOAD_ENV} is set: installed plugins were not loaded)")
    table = _table(title, ("type", "distribution", "roles", "class"), whole=("type",))
    for r in rows:
        if r.get("error"):
            table.add_row(r["type"], Text("broken", style="red"), "-", r["error"])
        else:
            # One item a line, so that a class path fits in one piece on an 80-column terminal.
            table.add_row(r["type"], r["distribution"].replace(" ", "\n", 1), "\n".join(r["roles"]) or "-",
                          r["class"])
    _emit(args, rows, table)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    # check reports the final backends' problems itself, as errors; the manager's warning of
    # them, meant for a training script's log, would show each one a second time.
    with _muted("ckptkit.manager"):
        ck = _manager(args)
    try:
        rows = []
        probed: dict[str, dict[str, Any]] = {}  # a backend serving both roles is probed once
        faulty: set[str] = set()  # whose probe itself failed: the plugin's fault, not the storage's
        for role in Role:
            rc = ck.config.role(role)
            if rc is None:
                continue
            # Config keys, not attribute names: the attribute async_ is the key async.
            settings = {k.rstrip("_"): v for k, v in attrs.asdict(rc).items() if k != "backends"}
            for name in ck.router.backends(role):
                spec = ck.config.backends[name]
                instance = ck.router.instances[name]
                row = {"role": role.value, "backend": name, "type": spec.type,
                       "distribution": ck.router.types[name].dist,
                       "location": _location(instance), "settings": settings}
                if args.probe:
                    if name not in probed:
                        try:
                            probed[name] = (ck.router.call_blaming(name, "probe")
                                            if ck.router.implements(name, "probe") else {})
                            if not isinstance(probed[name], dict):
                                raise ck.router.faulty(name, "probe", type(probed[name]).__name__,
                                                       "a dict of what was checked to what was found")
                        except CkptkitError as exc:  # a probe that raised instead of reporting
                            probed[name] = {"probe": str(exc)}
                            faulty.add(name)
                    row["probe"] = probed[name]
                rows.append(row)
        table = _table(f"{ck.config.source}: run {ck.run_name!r}, routing",
                       ("role", "backend", "type", "location", "settings") + (("probe",) if args.probe else ()),
                       whole=("role", "type"))
        for r in rows:
            # One setting a line, and the unset ones left to --json: it fits 80 columns.
            cells = [r["role"], r["backend"], r["type"], r["location"],
                     "\n".join(f"{k}={v}" for k, v in r["settings"].items() if v is not None)]
            if args.probe:
                bad = {k: v for k, v in r["probe"].items() if v != "ok"}
                cells.append("not supported" if not r["probe"] else
                             "\n".join(f"{k}: {v}" for k, v in bad.items()) if bad else "ok")
            table.add_row(*cells)
        problems = ck.final_problems()
        failed = [name for name, result in probed.items()
                  if name not in faulty and any(v != "ok" for v in result.values())]
        if failed:
            problems.append(f"probe failed for {', '.join(failed)}: the storage could not be written, listed, read "
                            "or cleaned as the table shows; check its address (for an object store, its bucket), "
                            "credentials, free space and permissions")
        if faulty:
            problems.append(f"the probe of {', '.join(sorted(faulty))} failed in the backend's plugin itself, as the "
                            "table shows: report it to the plugin's authors")
        _emit(args, {"config": ck.config.source, "run_name": ck.run_name, "routes": rows, "problems": problems}, table)
        for line in problems:
            _fail(line)
        if not args.json and not problems:
            console.print("[green]config OK[/green]")
        return 1 if problems else 0
    finally:
        ck.close()


@contextlib.contextmanager
def _muted(logger_name: str) -> Iterator[None]:
    """Drop the warnings of ``logger_name`` (its errors still show) while the block runs."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def _share(fraction: float) -> str:
    """A fraction as a percentage that never rounds a cut short of all of it up to 100%."""
    shown = f"{fraction:.0%}"
    digits = 1
    while shown.startswith("100") and fraction < 1 and digits < 6:
        shown, digits = f"{fraction:.{digits}%}", digits + 1
    return shown if not (shown.startswith("100") and fraction < 1) else "almost 100%"


def _location(instance: Any) -> str:
    # A backend's own location first: it may add what the filesystem leaves out (a WebDAV host).
    location = getattr(instance, "location", None)
    if location:
        return location
    root = getattr(instance, "root", None)
    fs = getattr(instance, "fs", None)
    if root is not None and fs is not None:
        return fs.unstrip_protocol(root)
    return type(instance).__name__


def cmd_ls(args: argparse.Namespace) -> int:
    ck = _manager(args)
    try:
        rows = []
        left_out: list[str] = []  # listed by the store, not shown: restore would not take them
        # Every backend is listed; one that cannot be is an error even when others answered.
        refs, unreachable = ck.reader.list_all()
        for ref in refs:
            try:
                m = ck.reader.manifest(ref)  # checked to lie where it says it belongs, as restore checks it
            except IncompatibleCheckpointError as exc:  # a newer ckptkit's: not listed, but not hidden
                warnings.warn(str(exc), RuntimeWarning, stacklevel=1)
                continue
            except CheckpointError as exc:  # what restore would say of it (a manifest in another step's folder)
                left_out.append(f"{ref.backend} step {ref.step} ({str(exc).splitlines()[0] if str(exc) else 'its manifest is damaged or missing'})")
                continue
            if ref.sizes is not None and any(ref.sizes.get(n) != e.size for n, e in m.files.items()):
                # Files that disagree with the manifest: not a checkpoint restore would take.
                left_out.append(f"{ref.backend} step {ref.step} (its files disagree with its manifest)")
                continue
            rows.append({"backend": ref.backend, "step": m.step, "epoch": m.epoch, "format": m.format,
                         "size": m.total_size, "files": len(m.files), "created": m.created,
                         "metrics": m.metrics, "mlflow_run_id": m.mlflow_run_id, "uri": ref.uri})
        if unreachable and not rows:
            raise _unlisted(unreachable)  # an empty table would read as an empty run
        if not rows:  # as verify: a script asking what it could resume from is told there is nothing
            raise _none_listed(args, ck, len(refs))
        table = _table(f"run {ck.run_name!r}: committed resume checkpoints",
                       ("backend", "step", "epoch", "format", "size", "created (UTC)", "metrics"),
                       whole=("step", "epoch", "size", "created (UTC)"))
        for r in rows:
            epoch = "-" if r["epoch"] is None else str(r["epoch"])
            table.add_row(r["backend"], str(r["step"]), epoch, r["format"], _size(r["size"]),
                          _when(r["created"]), "\n".join(f"{k}: {v:.4g}" for k, v in r["metrics"].items()))
        _emit(args, rows, table)
        if not args.json:
            _print_folders(ck, rows, unreachable)
        if left_out:
            warnings.warn(f"{len(left_out)} checkpoint{'s' if len(left_out) != 1 else ''} of the store's listing "
                          f"{'are' if len(left_out) != 1 else 'is'} not shown, as restore would not take "
                          f"{'them' if len(left_out) != 1 else 'it'}: {', '.join(left_out)}. "
                          "ckptkit verify tells what is wrong with each; prune deletes them only once older than "
                          "the checkpoints it keeps", RuntimeWarning, stacklevel=1)
        if unreachable:
            _fail("; ".join(str(e) for e in unreachable.values()) + "; the table shows what the other backends hold")
            return 1
        return 0
    finally:
        ck.close()


def _print_folders(ck: CheckpointManager, rows: list[dict[str, Any]], unreachable: dict[str, CkptkitError]) -> None:
    """Where each resume backend keeps the run, whole: a URI does not fit a table column on a
    narrow terminal. A backend holding none of the run's checkpoints says so."""
    for name in ck.router.backends(Role.RESUME):
        uri = next((r["uri"] for r in rows if r["backend"] == name), None)
        if uri is None:
            if name not in unreachable:  # one that could not be listed has its own error line
                console.print(f"{name}: no checkpoint of run {ck.run_name!r}", markup=False, highlight=False)
            continue
        folder, _, last = uri.rstrip("/").rpartition("/")
        # A third-party layout may name its checkpoints otherwise: shown as it is then.
        shown = f"{folder}/step-NNNNNNNNNN" if re.fullmatch(r"step-\d{10}", last) else uri
        console.print(f"{name}: {shown}", markup=False, highlight=False, soft_wrap=True)


def _none_listed(args: argparse.Namespace, ck: CheckpointManager, hidden: int) -> CheckpointError:
    """The error of a run with no checkpoint to show: none committed, or only damaged ones or a
    newer ckptkit's (``hidden``), which ls leaves out."""
    backends = ck.router.backends(Role.RESUME)
    where = f"resume backend{'s' if len(backends) != 1 else ''} {', '.join(_looked_in(ck, n) for n in backends)}"
    if hidden:
        return CheckpointError(f"run {ck.run_name!r} has no checkpoint that can be listed in {where}: "
                               f"{hidden} committed {'is' if hidden == 1 else 'are'} damaged or written by a "
                               "newer ckptkit; ckptkit verify says which")
    # The run name is easy to leave out: say where the one looked up came from.
    whose = ("" if args.run_name is not None else
             " (the config's run_name; pass --run-name for another run)" if ck.config.run_name else
             " (the default run name, as the config sets no run_name; pass --run-name)")
    return CheckpointNotFoundError(f"run {ck.run_name!r}{whose} has no committed checkpoint in {where}",
                                   ck.run_name)


def _looked_in(ck: CheckpointManager, name: str) -> str:
    """A resume backend with where it keeps runs: a relative path in a config is relative to the
    folder ckptkit runs in, and a mistyped one reads as an empty run."""
    instance = ck.router.instances[name]
    folder = instance.local_dir(instance.root) if isinstance(instance, FileBackend) else None
    missing = ", a folder that does not exist" if folder is not None and not os.path.isdir(folder) else ""
    return f"{name} ({_location(instance)}{missing})"


def _unlisted(unreachable: dict[str, CkptkitError]) -> StorageUnavailableError:
    """One error naming every resume backend that could not be listed."""
    first = next(iter(unreachable))
    error = StorageUnavailableError(first, "; ".join(str(e) for e in unreachable.values()))
    error.__cause__ = unreachable[first]
    return error


def cmd_verify(args: argparse.Namespace) -> int:
    ck = _manager(args)
    try:
        rows = []
        # Every backend is listed; one that cannot be fails the command, as for ls: a check run
        # from cron must not pass while a store it should check cannot be seen.
        refs, unreachable = ck.reader.list_all()
        if args.step is not None:
            refs = ck._copies_of(refs, unreachable, args.step)
        elif not refs and unreachable:
            ck._unreachable(refs, unreachable, resuming=False)  # raises: nothing found, and a store not seen
        # Verifying reads every byte: show how far it got (on stderr, so --json stays clean).
        # No track(disable=True): rich before 14.3 prints an empty line as a disabled bar stops.
        shown = refs if args.json or not refs else track(refs, description="verifying", console=err_console,
                                                          transient=True)
        for ref in shown:
            try:
                m = ck.verify(ref)
                rows.append({"backend": ref.backend, "step": ref.step, "ok": True, "result": "ok",
                             "detail": f"{len(m.files)} file{'s' if len(m.files) != 1 else ''}, {_size(m.total_size)}",
                             "uri": ref.uri})
            except LocalWriteError:
                raise  # this machine's disk: every checkpoint would fail alike, and none is damaged
            except Exception as exc:
                # A store that did not answer leaves the checkpoint unverified, not damaged: what
                # is told corrupt here, users delete.
                # Nor does a backend plugin's own failure (a BackendError that is no storage's).
                result = ("unverified" if isinstance(exc, StorageUnavailableError) else
                          "plugin" if isinstance(exc, BackendError) else
                          "newer" if isinstance(exc, IncompatibleCheckpointError) else "corrupt")
                detail = redact(str(exc), secret_values())
                if result == "corrupt" and _deleted_since(ck, ref):
                    # Pruned between the listing and its reads (a training saving beside a check run
                    # from cron): its files went one by one, which is no damage.
                    result, detail = "gone", ("deleted while it was being verified (a training's keep_last, or "
                                              "another prune): no longer a checkpoint of the run")
                rows.append({"backend": ref.backend, "step": ref.step, "ok": False, "result": result,
                             "detail": detail, "uri": ref.uri})
        table = _table(f"run {ck.run_name!r}: verification", ("backend", "step", "result", "detail"),
                       whole=("step", "result"))
        shown = {"ok": Text("ok", style="green"), "corrupt": Text("CORRUPT", style="red"),
                 "unverified": Text("unverified", style="yellow"), "newer": Text("newer ckptkit", style="yellow"),
                 "plugin": Text("plugin failed", style="yellow"), "gone": Text("gone", style="dim")}
        for r in rows:
            table.add_row(r["backend"], str(r["step"]), shown[r["result"]], r["detail"])
        if not rows and not unreachable:
            raise _none_listed(args, ck, 0)
        _emit(args, rows, table)
        corrupt = [r for r in rows if r["result"] == "corrupt"]
        unverified = [r for r in rows if r["result"] == "unverified"]
        newer = [r for r in rows if r["result"] == "newer"]
        faulty = [r for r in rows if r["result"] == "plugin"]
        if corrupt:
            err_console.print(f"ckptkit: error: {len(corrupt)} of {len(rows)} checkpoints failed verification")
        if unverified:
            _fail(f"{len(unverified)} of {len(rows)} checkpoints could not be read, the storage did not answer: "
                  "they are not known to be damaged; verify them again once it answers")
        if newer:
            _fail(f"{len(newer)} of {len(rows)} checkpoints were written by a newer ckptkit: upgrade ckptkit to "
                  "verify them")
        if faulty:
            _fail(f"{len(faulty)} of {len(rows)} checkpoints could not be verified, as their backend's plugin failed "
                  "(see each one's detail): they are not known to be damaged")
        if unreachable:
            _fail("; ".join(str(e) for e in unreachable.values()) + "; its checkpoints were not verified")
        return 1 if corrupt or unverified or newer or faulty or unreachable else 0
    finally:
        ck.close()


def _deleted_since(ck: CheckpointManager, ref: CheckpointRef) -> bool:
    """Whether checkpoint ``ref`` is no longer listed on its backend (a prune deleted it since
    the listing), asked again once reading it failed."""
    try:
        refs, unreachable = ck.reader.list_all()
    except Exception:  # noqa: BLE001 - not known to be gone: the failure stands as it was
        return False
    return ref.backend not in unreachable and not any(
        (r.backend, r.step, r.uri) == (ref.backend, ref.step, ref.uri) for r in refs)


def cmd_prune(args: argparse.Namespace) -> int:
    if args.all and args.keep_last is not None:
        # "Delete all but N" read as --all wipes the run, the newest step included.
        raise CkptkitError("--all deletes every checkpoint of the run, the newest included, and --keep-last keeps "
                           "some: give one of them (--keep-last N alone keeps the newest N)")
    ck = _manager(args)
    try:
        failed: PruneError | None = None
        if not args.all and args.keep_last is not None and args.keep_last < 1:
            raise CkptkitError("--keep-last must be at least 1")
        try:
            result = ck.delete_run(dry_run=args.dry_run) if args.all else \
                ck.prune(keep_last=args.keep_last, dry_run=args.dry_run)
        except PruneError as exc:  # what the other backends lost is shown all the same
            if len(exc.failures) == 1 and not exc.result.deleted and not exc.result.corrupt:
                raise next(iter(exc.failures.values())) from None  # nothing else to show: the error as it is
            failed, result = exc, exc.result
        doomed, corrupt, keep = list(result.deleted), result.corrupt, result.keep_last
        rows = [{"backend": r.backend, "step": r.step if r.step >= 0 else None, "kind": r.role, "uri": r.uri}
                for r in doomed]
        # A store that did not answer leaves a checkpoint unverified, not damaged (as verify tells it).
        damaged = [{"backend": r.backend, "step": r.step, "uri": r.uri, "error": redact(str(e), secret_values()),
                    "kind": ("newer ckptkit" if isinstance(e, IncompatibleCheckpointError) else
                             "unverified" if isinstance(e, StorageUnavailableError) else "damaged")}
                   for r, e in corrupt]
        verb = "would delete" if args.dry_run else "deleted"
        table = _table(f"run {ck.run_name!r}: {verb} ({'all' if args.all else f'keep_last={keep}'})",
                       ("backend", "step", "kind", "uri"), whole=("step",))
        for r in rows:
            table.add_row(r["backend"], str(r["step"] if r["step"] is not None else "-"), r["kind"], r["uri"])
        for d in damaged:
            # Listed under what was deleted, but never deleted itself: its row says so.
            table.add_row(d["backend"], str(d["step"]), Text(f"{d['kind']}: kept, not counted",
                                                             style="red" if d["kind"] == "damaged" else "yellow"),
                          d["error"])
        _emit(args, {"dry_run": args.dry_run, "keep_last": keep, "all": args.all, "deleted": rows,
                     "damaged": damaged,
                     **({"failed": {n: redact(str(e), secret_values()) for n, e in failed.failures.items()}}
                        if failed is not None else {})}, table if rows or damaged else None)
        if failed is not None:
            _fail("; ".join(str(e) for e in failed.failures.values()) + (
                "; the table shows what the other backends lost" if rows and not args.json else ""))
            return 1
        if not rows and not damaged and not args.json:
            # Where it looked: a relative path run from another folder reads as an empty run.
            looked = ", ".join(_looked_in(ck, n) for n in ck.router.backends(Role.RESUME))
            console.print(f"run {ck.run_name!r}: nothing to delete ({'all' if args.all else f'keep_last={keep}'}) "
                          f"in {looked}", markup=False, highlight=False)
        return 0
    finally:
        ck.close()


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.publish and args.config is None:
        # The demo's own config publishes always; --publish asks it of a config given.
        raise CkptkitError("demo: --publish applies with --config (the demo's own config publishes its model "
                           "already); add --config FILE, or leave --publish out")
    try:
        summary = run_demo(args.workdir, steps=args.steps, console=None if args.json else console,
                           config=args.config, publish=args.publish or None)
    except (ValueError, FileExistsError, NotADirectoryError) as exc:  # a bad --steps or --workdir
        raise CkptkitError(str(exc)) from None
    if args.json:
        _emit(args, summary, None)
    return 0 if summary["resumed_matches_uninterrupted"] else 1


def cmd_export(args: argparse.Namespace) -> int:
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out):
        raise CkptkitError(f"--out: {args.out} is a folder; name the file to write")
    if not os.path.isdir(out_dir):
        raise CkptkitError(f"--out: the folder {out_dir} does not exist")
    ck = _manager(args)
    try:
        try:
            done = ck.export(args.out, step=args.step, dtype=args.dtype, replace=args.force)
        except FileExistsError as exc:
            if exc.filename != args.out:
                raise
            # Another step's model, or a file someone points at (a registered model's artifact).
            raise CkptkitError(f"--out: {args.out} exists; pass --force to replace it (replaced whole, once the new "
                               "file is complete), or name another file") from None
        row = {"step": done.step, "format": done.manifest.format, "source": done.ref.uri, "out": args.out}
        table = _table(f"run {ck.run_name!r}: exported", row, whole=("step", "format"))
        table.add_row(*(str(v) for v in row.values()))
        _emit(args, row, table)
        return 0
    finally:
        ck.close()


def cmd_publish(args: argparse.Namespace) -> int:
    from .publish import final_backends, find_source, publish

    ck = CheckpointManager.from_config(args.config, run_name=args.run_name,
                                       fallback_dir=args.fallback_dir or "ckptkit-fallback")
    try:
        final_backends(ck, args.backend or None)  # a misnamed backend first, not "no final model"
        source = find_source(ck, step=args.step, path=args.source, fallback_dir=args.fallback_dir)
        result = publish(ck, source, backends=args.backend or None, algorithm=args.algorithm, force=args.force)
        what = f"the {source.kind} checkpoint of step {source.manifest.step} from {source.uri}"
        title = (f"run {ck.run_name!r}: nothing to publish, {what} is held already where it was to go"
                 if result.ok and not result.published else
                 f"run {ck.run_name!r}: published {what}" if result.ok else
                 f"run {ck.run_name!r}: published {what} to some backends, not all" if result.published else
                 f"run {ck.run_name!r}: did not publish {what}")
        table = _table(title, ("backend", "result", "where"), whole=("result",))
        for r in result.already_held:
            table.add_row(r.backend, "already held", r.uri)
        for r in result.published:
            table.add_row(r.backend, Text("published", style="green"), r.uri)
        for name, reason in result.failures.items():
            table.add_row(name, Text("FAILED", style="red"), reason)
        _emit(args, result.to_dict(), table)
        if not result.ok:
            err_console.print(f"ckptkit: error: not published to {', '.join(result.failures)}; "
                              f"the model stays at {source.uri}", markup=False, highlight=False, soft_wrap=True)
            return 1
        return 0
    finally:
        ck.close()


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import format_size, make_plan, parse_size

    from .config import Config
    from .routing import Router

    config = Config.load(args.config)
    state = parse_size(args.state_size, "--state-size")
    # No plan for a config that cannot run: each backend's type installed and able to serve its
    # roles. Nothing is built (a store's client may look for credentials it has only on the
    # cluster); ckptkit check goes on to each backend's own options.
    Router.types_for(make_plugin_manager(), config)
    final = parse_size(args.final_size, "--final-size") if args.final_size else None
    plan = make_plan(config, state, args.steps, final_size=final)
    columns = ("role", "backend", "type", "copies", "at end", "at peak", "note")
    whole = ("role", "type", "copies", "at end", "at peak")
    # Two tables rather than a column saying which plan: each fits 80 columns.
    tables = [_table(f"{config.source}: {format_size(state)} state, {args.steps} steps, {plan.saves} resume "
                     f"saves (keep_last={plan.keep_last}), routed by ckptkit", columns, whole),
              _table("the same training with every resume checkpoint also uploaded to MLflow", columns, whole)]
    for table, rows in zip(tables, (plan.routed, plan.duplicate)):
        for h in rows:
            table.add_row(h.role, h.backend, h.type, str(h.copies), format_size(h.end_bytes),
                          format_size(h.peak_bytes), h.note)
    _emit(args, plan.to_dict(), tables[0])
    if not args.json:
        console.print(tables[1])
        console.print(f"resume checkpoints at the end: {format_size(plan.resume_end)} routed against "
                      f"{format_size(plan.duplicate_resume_end)} with duplicate uploads to MLflow, "
                      f"{_share(plan.resume_cut)} less; everything: {format_size(plan.total_end)} against "
                      f"{format_size(plan.duplicate_total_end)} ({_share(plan.total_cut)})")
    return 0


def cmd_migrate_config(args: argparse.Namespace) -> int:
    from .migrate import migrate_file

    migration = migrate_file(args.trainer_config)
    if args.out is None:
        sys.stdout.write(migration.to_yaml())  # its comments give the reason for each setting
        return 0
    if os.path.exists(args.out) and not args.force:
        raise CkptkitError(f"--out: {args.out} exists; pass --force to replace it")
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(migration.to_yaml())
    print(migration.explanation())
    print(f"wrote {args.out}; check it with: ckptkit check {args.out}")
    return 0


# -- parser -----------------------------------------------------------------------------------

def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=_path, help="the ckptkit YAML config")
    p.add_argument("--run-name", help="the run (default: run_name from the config, else 'default')")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _path(value: str) -> str:
    """A path option with ``~`` expanded: the shell leaves ``--out=~/m.pt`` as it is, and a folder
    named ``~`` made in the current one is a trap (``rm -rf ~`` to remove it)."""
    return os.path.expanduser(value)


def _step(value: str) -> int:
    """A ``--step``: a count from 0, as ``save`` takes it; anything else is refused as the
    options are, not as a traceback from deep inside."""
    try:
        step = int(value)
    except ValueError:
        step = -1
    if step < 0:
        raise argparse.ArgumentTypeError(f"a step is a whole number from 0 up, not {value!r}")
    return step


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ckptkit", description="Role-routed PyTorch checkpoints.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = add("backends", cmd_backends, "list installed backend types, their distributions and roles")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = add("check", cmd_check, "validate a config and show which backends serve which role")
    _config_args(p)
    p.add_argument("--probe", action="store_true", help="also write, list, read and delete a small object on each backend")
    p = add("ls", cmd_ls, "list the committed resume checkpoints of a run")
    _config_args(p)
    p = add("verify", cmd_verify, "check every file of every checkpoint against its manifest")
    _config_args(p)
    p.add_argument("--step", type=_step, help="verify only this step")
    p = add("prune", cmd_prune, "delete all but the newest keep_last checkpoints that verify (damaged newer ones "
                                "stay and are reported), and old leftovers")
    _config_args(p)
    p.add_argument("--keep-last", type=int, help="override roles.resume.keep_last")
    p.add_argument("--dry-run", action="store_true",
                   help="show what would be deleted, delete nothing (a leftover only the store's clock could "
                        "prove old, which a dry run does not write to read, is shown as kept)")
    p.add_argument("--all", action="store_true",
                   help="delete every resume checkpoint of the run, the newest included (frees the run name)")
    p = add("demo", cmd_demo, "train a small model on the CPU with an interruption and a resume")
    p.add_argument("--workdir", type=_path, default="ckptkit-demo", help="where the demo keeps its files (default: ./ckptkit-demo)")
    p.add_argument("--config", type=_path, help="run against this config's backends and routing instead, under a new run name")
    p.add_argument("--publish", action="store_true",
                   help="with --config, publish the demo's model to the config's final backends too (a new "
                        "version of its registered models)")
    p.add_argument("--steps", type=int, default=60, help="training steps (default: 60)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p = add("export", cmd_export, "write one full model file from a (sharded or full) resume checkpoint")
    _config_args(p)
    p.add_argument("--out", type=_path, required=True, help="the model file to write")
    p.add_argument("--step", type=_step, help="export this step (default: the newest verified)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="cast floating-point tensors")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p = add("publish", cmd_publish, "publish a stored final or resume checkpoint through the final backends")
    _config_args(p)
    p.add_argument("--step", type=_step, help="publish this resume checkpoint (default: the newest stored final model)")
    p.add_argument("--from", dest="source", type=_path, metavar="FOLDER", help="publish the checkpoint in this folder")
    p.add_argument("--backend", action="append", help="publish only to this final backend (repeatable)")
    p.add_argument("--algorithm", help="the {algorithm} tag (default: the config's, else the one stored)")
    p.add_argument("--fallback-dir", type=_path, help="where finalize left the model when no backend took it "
                                          "(default: ./ckptkit-fallback)")
    p.add_argument("--force", action="store_true", help="write again to backends that already hold these bytes")
    p = add("plan", cmd_plan, "bytes each role and backend will hold, beside duplicate uploads to MLflow")
    p.add_argument("config", type=_path, help="the ckptkit YAML config")
    p.add_argument("--state-size", required=True, help="bytes of one resume checkpoint, e.g. 14GB")
    p.add_argument("--final-size", help="bytes of the final model (default: the state size)")
    p.add_argument("--steps", type=int, required=True, help="training steps")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = add("migrate-config", cmd_migrate_config,
            "turn a trainer config (paths.checkpoints, mlflow) into a ckptkit config, saying why for each setting")
    p.add_argument("trainer_config", type=_path, metavar="TRAINER_CONFIG", help="the trainer's YAML")
    p.add_argument("-o", "--out", type=_path, help="write the config here and print the reasons (default: the config, "
                                       "commented, on stdout)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser


def _version() -> str:
    from . import __version__

    return __version__


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """Keep MLflow's INFO lines (database set-up and migrations) out of ckptkit's output.

    Its warnings and errors still show. MLflow sets its loggers' level from MLFLOW_LOGGING_LEVEL
    when it is first imported, and a level the user set there wins.
    """
    if os.environ.get("MLFLOW_LOGGING_LEVEL"):
        yield
        return
    os.environ["MLFLOW_LOGGING_LEVEL"] = "WARNING"
    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_LOGGING_LEVEL", None)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """A warning as one line (a checkpoint skipped, and why), not Python's file, line and source."""
    err_console.print(f"ckptkit: warning: {redact(str(message), secret_values())}", markup=False,
                      highlight=False, soft_wrap=True)


class _UsageError(Exception):
    """A command line argparse refused, raised instead of exiting so that it can also be told as JSON."""

    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser = parser
        self.message = message


class _Parser(argparse.ArgumentParser):
    # Sub-parsers are built with the parent's class, so every command's usage errors come here.
    def error(self, message: str) -> Any:
        raise _UsageError(self, message)


def _print_error(kind: str, message: str) -> None:
    """An error as one JSON object on stdout, for --json: a script reading stdout gets something
    it can parse (the exit status stays nonzero)."""
    print(json.dumps({"error": {"type": kind, "message": redact(message, secret_values())}}, indent=2))


def _report(args: argparse.Namespace, kind: str, message: str, prefix: str = "ckptkit: error: ") -> None:
    """An error that ends the command: one line on stderr, and with --json one object on stdout."""
    if getattr(args, "json", False) and not getattr(args, "emitted", False):
        _print_error(kind, message)
    err_console.print(f"{prefix}{redact(message, secret_values())}", markup=False, highlight=False,
                      soft_wrap=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return build_parser().parse_args(argv)
    except _UsageError as exc:
        if "--json" in argv:  # no namespace yet: the words themselves say whether JSON was asked for
            _print_error("UsageError", f"{exc.parser.prog}: {exc.message}")
        argparse.ArgumentParser.error(exc.parser, exc.message)  # usage and message on stderr, exit 2


class _LogLines(logging.Handler):
    """The log records of ckptkit and its plugins (``ckptkit_s3``, ...), warnings and errors, as
    the CLI's one-line messages: without a handler Python prints them bare, with no prefix and
    nothing redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".", 1)[0].startswith("ckptkit") and super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            kind = "error" if record.levelno >= logging.ERROR else "warning"
            err_console.print(f"ckptkit: {kind}: {redact(record.getMessage(), secret_values())}", markup=False,
                              highlight=False, soft_wrap=True)
        except Exception:  # a record that cannot be printed must not fail the code that logged it
            self.handleError(record)


@contextlib.contextmanager
def _log_lines() -> Iterator[None]:
    # On the root logger, where the records of every plugin's own logger arrive.
    handler = _LogLines(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        with _quiet_mlflow(), _log_lines(), warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.func(args)
    except (CkptkitError, OSError) as exc:  # a file the command was pointed at: one line, no traceback
        # The last line of defence: whatever raised, no credential reaches the terminal.
        _report(args, type(exc).__name__, str(exc))
        return 1
    except KeyboardInterrupt:  # the user's own stop: no traceback; what was committed stays committed
        _report(args, "KeyboardInterrupt", "interrupted", prefix="ckptkit: ")
        return 130


if __name__ == "__main__":
    sys.exit(main())
