"""The demo job: a small model trained on the CPU, interrupted, resumed and published.

It says what it does while it does it (a progress bar for each phase, one line when a phase
ends) and ends with a summary in units, what "tracked bytes" means, and the command that opens
the MLflow UI on the result. With a config of the user's it runs against those backends instead,
under a run name of its own, so that no real run is touched.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import time
import urllib.parse
from datetime import datetime, timezone
from typing import Any, Iterator

import attrs
import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .config import Config
from .errors import ConfigError
from .manager import CheckpointManager
from .plan import format_size
from ._project import DISABLE_AUTOLOAD_ENV
from .plugins import autoload_enabled, install_hint, make_plugin_manager
from .redact import redact, secret_values
from .rng import RngState
from .roles import Role

MARKER = ".ckptkit-demo"
EVERY = 10
KEEP_LAST = 3
REGISTRY_TYPE = "mlflow"
# Tracking URIs that name a server the user opens directly; any other is a store `mlflow ui` reads.
SERVER_SCHEMES = ("http://", "https://", "databricks")


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
    return model, opt, sched


_TRUE_W = torch.linspace(-1, 1, 32)


def _train_step(model, opt, sched) -> float:
    # Batches come from the global generators, which RngState saves and restores.
    x = torch.randn(64, 32)
    y = (x @ _TRUE_W).unsqueeze(1) + 0.1 * torch.randn(64, 1)
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def _config(workdir: str) -> dict[str, Any]:
    backends: dict[str, Any] = {"scratch": {"type": "local", "path": os.path.join(workdir, "checkpoints")}}
    if REGISTRY_TYPE in make_plugin_manager().backend_types:
        backends["registry"] = {
            "type": REGISTRY_TYPE,
            "tracking_uri": f"sqlite:///{os.path.join(workdir, 'mlflow.db')}",
            "artifact_location": os.path.join(workdir, "mlartifacts"),
            "experiment": "ckptkit-demo",
            "registered_model_name": "ckptkit_demo_{algorithm}",
        }
        final = "registry"
    else:
        backends["published"] = {"type": "local", "path": os.path.join(workdir, "final")}
        final = "published"
    return {
        "run_name": "demo",
        "algorithm": "mlp",
        "backends": backends,
        "roles": {"resume": {"backends": ["scratch"], "every_n_steps": EVERY, "keep_last": KEEP_LAST},
                  "final": {"backends": [final]}},
    }


def user_config(path: str) -> Config:
    """The user's config with the demo's schedule: its backends and routing, a save every
    ``EVERY`` steps and ``KEEP_LAST`` kept, so that a short training shows a crash and a resume."""
    config = Config.load(path)
    if config.resume is None:
        raise ConfigError(f"{config.source}: roles.resume: the demo needs a resume backend to interrupt and resume")
    return attrs.evolve(config, algorithm=config.algorithm or "mlp",
                        resume=attrs.evolve(config.resume, every_n_steps=EVERY, keep_last=KEEP_LAST))


# What a demo makes in its folder: a folder holding anything else is not removed for the next demo.
_MADE = frozenset({MARKER, "checkpoints", "ckptkit.yaml", "mlartifacts", "mlflow.db", "final", "fallback",
                   "mlflow.db-journal", "mlflow.db-wal", "mlflow.db-shm"})  # SQLite's, left by a demo killed


def _fresh_workdir(workdir: str) -> tuple[str, bool]:
    """``workdir``, absolute and empty but for the demo's marker, and whether an earlier demo's
    files were removed from it."""
    workdir = os.path.abspath(workdir)
    removed = False
    if os.path.isdir(workdir) and os.listdir(workdir):
        if not os.path.exists(os.path.join(workdir, MARKER)):
            raise FileExistsError(f"{workdir} exists, holds files and is not a ckptkit demo folder: nothing in it "
                                  "was touched; give --workdir a new or empty folder")
        others = sorted(set(os.listdir(workdir)) - _MADE)
        if others:
            raise FileExistsError(f"{workdir} holds an earlier demo and files it did not make ({', '.join(others[:5])}"
                                  f"{' ...' if len(others) > 5 else ''}): nothing in it was touched; move those "
                                  "away, or give --workdir a new or empty folder")
        shutil.rmtree(workdir)
        removed = True
    try:
        os.makedirs(workdir, exist_ok=True)
        open(os.path.join(workdir, MARKER), "w").close()
    except OSError as exc:
        raise OSError(exc.errno, f"cannot make the demo's folder {workdir} ({exc.strerror}); pass --workdir "
                                 "with a folder you can write") from None
    return workdir, removed


class _Phase:
    """One phase on the console: a live bar (or spinner) while it runs, one line when it ends."""

    def __init__(self, progress: Progress | None, task: Any, done: str):
        self._progress = progress
        self._task = task
        self.done = done  # the line printed when the phase ends; the phase may refine it

    def advance(self, description: str | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, **({"description": description} if description else {}))

    def say(self, description: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=description)


@contextlib.contextmanager
def _phase(console: Console | None, description: str, total: int | None = None) -> Iterator[_Phase]:
    if console is None:
        yield _Phase(None, None, description)
        return
    started = time.perf_counter()
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn()]
    if total is not None:
        columns.append(MofNCompleteColumn())
    # Transient: the bar gives way to the phase's one line. Off a terminal there is no bar at all,
    # so that output piped to a file holds only those lines.
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True,
                  disable=not console.is_terminal) as progress:
        phase = _Phase(progress, progress.add_task(description, total=total), description)
        yield phase
    console.print(f"[green]✓[/green] {phase.done} [dim]({time.perf_counter() - started:.1f} s)[/dim]",
                  highlight=False)


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


def _model_label(uri: str) -> str:
    """``models:/name/1`` as ``name v1``; any other address as it is."""
    if uri.startswith("models:/"):
        name, _, version = uri[len("models:/"):].rpartition("/")
        if name and version.isdigit():
            return f"{name} v{version}"
    return uri


def _mlflow_views(ck: CheckpointManager, registered: list[str]) -> list[str]:
    """How to look at the result: ``mlflow ui`` on an embedded store, the address of a server."""
    lines = []
    for name in ck.router.backends(Role.FINAL) if ck.config.final else ():
        if ck.config.backends[name].type != REGISTRY_TYPE:
            continue
        uri = getattr(ck.router.instances[name], "tracking_uri", None)
        if not uri:
            continue
        uri = redact(uri, secret_values())
        if uri.startswith(SERVER_SCHEMES):
            # The address to open, its user part left out: "***@" is no address a browser takes.
            parts = urllib.parse.urlsplit(uri)
            lines.append(f"open {urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition('@')[2]))}")
        else:
            lines.append(f"mlflow ui --backend-store-uri {shlex.quote(uri)}")
            for label in registered:
                model, _, version = label.rpartition(" v")
                lines.append(f"  then open http://127.0.0.1:5000/#/models/{model}/versions/{version}")
    return lines


def run_demo(workdir: str | None, steps: int = 60, console: Console | None = None,
             config: str | None = None, publish: bool | None = None) -> dict[str, Any]:
    """Train ``steps`` steps, crash after about 60% of them, resume, finish, publish.

    The resumed run is compared with an uninterrupted one from the same seed: their final
    weights must be bit-identical, which shows that model, optimizer, LR scheduler and data
    RNG state all came back. With ``config`` (a YAML path) it uses that config's backends and
    routing under a new run name; otherwise a local folder and an embedded MLflow store in
    ``workdir``. ``publish``: send the demo's model to the final backends (default: only the
    demo's own; a config's would register the toy model as a new version of its models).
    """
    if steps < 2 * EVERY:
        raise ValueError(f"the demo needs at least {2 * EVERY} steps")
    began = time.perf_counter()
    ending = "and the final model published once."
    if config is None:
        workdir, removed = _fresh_workdir(workdir or "ckptkit-demo")
        source: Config | dict[str, Any] = _config(workdir)
        # The config written beside what it makes, so that the CLI can be tried on it.
        written = os.path.join(workdir, "ckptkit.yaml")
        with open(written, "w", encoding="utf-8") as f:
            yaml.safe_dump(source, f, sort_keys=False)
        run_name = None
        fallback = os.path.join(workdir, "fallback")
        where = f"in {workdir}" + (" (the earlier demo's files there removed)" if removed else "")
    else:
        source = user_config(config)
        if source.final is None:
            ending = "and no final model published (the config has no final role)."
        elif not publish:
            used = set(source.resume.backends)
            source = attrs.evolve(source, final=None,
                                  backends={k: v for k, v in source.backends.items() if k in used})
            ending = ("and no final model published: that would register this toy model as a new version of "
                      "the config's registered models; add --publish to publish it too.")
        run_name = datetime.now(timezone.utc).strftime("ckptkit-demo-%Y%m%d-%H%M%S")
        fallback = "ckptkit-fallback"
        written = None
        where = f"with the backends of {config}, run {run_name!r}"
    say = console.print if console else (lambda *a, **k: None)
    crash_after = int(steps * 0.6) + 1

    def open_manager() -> CheckpointManager:
        return CheckpointManager.from_config(source, run_name=run_name, fallback_dir=fallback)

    say(f"[bold]ckptkit demo[/bold] {where}: a small model trained on the CPU for {steps} steps, a resume "
        f"checkpoint every {EVERY} steps (keep_last {KEEP_LAST}), a crash after step {crash_after - 1}, a "
        f"resume, {ending}", highlight=False)

    if config is not None:
        # Every config error (a backend type not installed, an option it does not take) before
        # any training, as a trainer would meet it.
        open_manager().close()

    with _phase(console, "reference run, never interrupted", total=steps) as phase:
        reference, r_opt, r_sched = _setup()
        for _ in range(steps):
            _train_step(reference, r_opt, r_sched)
            phase.advance()
        phase.done = f"trained a reference run of {steps} steps without interruption, to compare against"

    model, opt, sched = _setup()
    rng = RngState()
    saves = 0

    def save(ck: CheckpointManager, phase: _Phase, step: int, loss: float) -> None:
        nonlocal saves
        if step % EVERY == 0:
            # The first save also opens the run in the tracking store: it takes longest.
            phase.say(f"saving the resume checkpoint of step {step}")
            saves += 1
        ck.save(step=step, epoch=0, model=model, optimizer=opt, metrics={"loss": loss},
                extra={"lr_scheduler": sched}, rank_extra={"rng": rng})
        phase.advance("training")

    with open_manager() as ck, _phase(console, "training", total=crash_after) as phase:
        names = ", ".join(ck.router.backends(Role.RESUME))
        for step in range(crash_after):
            save(ck, phase, step, _train_step(model, opt, sched))
        phase.done = (f"trained steps 0-{crash_after - 1}, {_count(saves, 'resume checkpoint')} saved to {names}; "
                      f"[red]simulated crash[/red]: the process state is gone")
    del model, opt, sched

    model, opt, sched = _setup(seed=123)  # fresh objects and generators; restore must overwrite them
    with open_manager() as ck:
        with _phase(console, "restoring the newest checkpoint") as phase:
            restored = ck.restore(model=model, optimizer=opt, extra={"lr_scheduler": sched}, rank_extra={"rng": rng})
            start = restored.step + 1 if restored else 0
            phase.done = (f"restarted: restored step {restored.step} (model, optimizer, LR schedule, RNG state) "
                          f"from {restored.ref.uri}" if restored else "restarted: nothing to restore")
        before = saves
        with _phase(console, "training", total=steps - start) as phase:
            loss = float("nan")
            for step in range(start, steps):
                loss = _train_step(model, opt, sched)
                save(ck, phase, step, loss)
            phase.done = (f"trained steps {start}-{steps - 1}, {_count(saves - before, 'more resume checkpoint')} "
                          "saved, the older ones pruned")
        finals = ", ".join(ck.router.backends(Role.FINAL)) if ck.config.final else ""
        published = []
        if finals:
            with _phase(console, f"publishing the final model to {finals}") as phase:
                published = ck.finalize(model=model, step=steps - 1, epoch=0, metrics={"loss": loss})
                phase.done = (f"published the final model to {finals}: "
                              f"{', '.join(_model_label(r.uri) for r in published)}")
        kept = ck.list_checkpoints()
        stored = {r.backend: 0 for r in kept}
        sizes = []
        for ref in kept:
            size = ck.reader.manifest(ref).total_size
            stored[ref.backend] += size
            sizes.append(size)
        registered = [_model_label(r.uri) for r in published if r.uri.startswith("models:/")]
        views = _mlflow_views(ck, registered)
        # Publishing has settled the run's lookup; without a tracker there is nothing to wait for.
        run_id = ck.tracking_run_id(timeout=10.0 if views else 0.0)
        actual_run = ck.run_name

    # A backend that reports no sizes (a third-party one may not) leaves the figure unknown.
    known = [sum(r.sizes.values()) for r in published if r.sizes is not None]
    final_bytes = max(known) if known else (None if published else 0)
    per_save = round(sum(sizes) / len(sizes)) if sizes else 0
    matches = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    summary = {
        "workdir": workdir if config is None else None,
        "config": config,
        "config_written": written,
        "run_name": actual_run,
        "steps": steps,
        "saves": saves,
        "crashed_after_step": crash_after - 1,
        "restored_step": restored.step if restored else None,
        "kept_checkpoints": sorted({r.step for r in kept}),
        "resume_bytes_stored": stored,
        "final_model": [r.uri for r in published],
        "registered_models": registered,
        # What the tracking store holds: the final model once, against every checkpoint as well.
        "tracked_bytes": final_bytes,
        "tracked_bytes_if_every_checkpoint_were_logged": None if final_bytes is None else final_bytes + saves * per_save,
        "final_loss": loss,
        "mlflow_run_id": run_id,
        "mlflow_ui": views,
        "resumed_matches_uninterrupted": matches,
        "seconds": round(time.perf_counter() - began, 1),
        "registry_missing": config is None and "registry" not in source["backends"],
    }
    if console:
        _print_summary(console, summary, per_save)
    return summary


def _print_summary(console: Console, s: dict[str, Any], per_save: int) -> None:
    table = Table(title="ckptkit demo summary", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    logged = s["tracked_bytes_if_every_checkpoint_were_logged"]
    ratio = f", {logged / s['tracked_bytes']:.0f}x as much" if s["tracked_bytes"] else ""
    rows = [
        ("resumed run", Text("bit-identical to the uninterrupted run", style="green") if s["resumed_matches_uninterrupted"]
         else Text("differs from the uninterrupted run", style="red")),
        ("interruption", f"crashed after step {s['crashed_after_step']}, resumed from step {s['restored_step']}"),
        ("resume checkpoints", f"{s['saves']} saved, about {format_size(per_save)} each; the newest {KEEP_LAST} "
                               f"kept (steps {', '.join(map(str, s['kept_checkpoints']))})"),
        ("resume storage", ", ".join(f"{format_size(n)} in {b}" for b, n in s["resume_bytes_stored"].items()) or "-"),
        ("final model", ", ".join(s["registered_models"] or s["final_model"]) or "-"),
        ("final loss", f"{s['final_loss']:.4f}"),
    ]
    if s["tracked_bytes"] is None:
        rows.append(("tracked bytes", "unknown: the final backends report no sizes"))
    else:
        rows += [("tracked bytes", format_size(s["tracked_bytes"])),
                 ("if every checkpoint were logged", f"{format_size(logged)}{ratio}")]
    if s["mlflow_run_id"]:
        rows.append(("MLflow run", s["mlflow_run_id"]))
    rows.append(("took", f"{s['seconds']:.1f} s"))
    for k, v in rows:
        table.add_row(k, v if isinstance(v, Text) else Text(v))  # paths and names as they are, never markup
    console.print(table)
    if logged is not None:
        console.print("Tracked bytes are what the final backends (the experiment tracker) hold for this run: "
                      "ckptkit sends them the final model once. A trainer that also logged every resume checkpoint "
                      f"there would store {format_size(logged)}, and nothing would ever prune it; here the resume "
                      f"checkpoints stay on {', '.join(s['resume_bytes_stored']) or 'the resume backends'}, "
                      f"where only the newest {KEEP_LAST} are kept.", markup=False, highlight=False)
    if s["mlflow_ui"]:
        console.print("See the run and the registered model in the MLflow UI:", highlight=False)
        for line in s["mlflow_ui"]:
            console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
    if s["registry_missing"]:
        how = (f"unset {DISABLE_AUTOLOAD_ENV} (it keeps installed plugins from loading) where ckptkit-mlflow is "
               "installed, else " if not autoload_enabled() else "")
        console.print("No MLflow backend was found, so the final model went to a local folder instead of a model "
                      f"registry. To register it, {how}{install_hint('mlflow')}, and run the demo again.",
                      markup=False, highlight=False)
    if s.get("config_written"):
        shown = shlex.quote(os.path.relpath(s["config_written"]))
        console.print(f"Its config is {shown}; try the CLI on what it made: ckptkit ls {shown}, ckptkit verify "
                      f"{shown}, ckptkit export {shown} --out model.pt", markup=False, highlight=False)
    if s["config"]:
        console.print(f"The demo's checkpoints stay in run {s['run_name']!r}; delete them with: ckptkit prune "
                      f"{shlex.quote(s['config'])} --run-name {s['run_name']} --all", markup=False, highlight=False)
