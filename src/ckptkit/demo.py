"""The demo job: a small model trained on the CPU, interrupted, resumed and published."""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from .manager import CheckpointManager
from .plugins import make_plugin_manager
from .rng import RngState

MARKER = ".ckptkit-demo"
EVERY = 10
KEEP_LAST = 3


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
    if "mlflow" in make_plugin_manager().backend_types:
        backends["registry"] = {
            "type": "mlflow",
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


def _tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def run_demo(workdir: str, steps: int = 60, console: Console | None = None) -> dict[str, Any]:
    """Train ``steps`` steps, crash after about 60% of them, resume, finish, publish.

    The resumed run is compared with an uninterrupted one from the same seed: their final
    weights must be bit-identical, which shows that model, optimizer, LR scheduler and data
    RNG state all came back.
    """
    if steps < 2 * EVERY:
        raise ValueError(f"the demo needs at least {2 * EVERY} steps")
    workdir = os.path.abspath(workdir)
    if os.path.isdir(workdir) and os.listdir(workdir):
        if not os.path.exists(os.path.join(workdir, MARKER)):
            raise FileExistsError(f"{workdir} exists and is not a ckptkit demo folder; pass --workdir")
        shutil.rmtree(workdir)
    os.makedirs(workdir)
    open(os.path.join(workdir, MARKER), "w").close()
    say = console.print if console else (lambda *a, **k: None)
    config = _config(workdir)
    crash_after = int(steps * 0.6) + 1

    reference, r_opt, r_sched = _setup()
    for _ in range(steps):
        _train_step(reference, r_opt, r_sched)

    say(f"[bold]ckptkit demo[/bold] in {workdir}: {steps} steps, a save every {EVERY}, keep_last={KEEP_LAST}")
    model, opt, sched = _setup()
    rng = RngState()
    saved_bytes: list[int] = []  # the size of every resume checkpoint written, pruned or not

    def save(ck: CheckpointManager, step: int, loss: float) -> None:
        refs = ck.save(step=step, epoch=0, model=model, optimizer=opt, metrics={"loss": loss},
                       extra={"lr_scheduler": sched}, rank_extra={"rng": rng})
        saved_bytes.extend(sum(r.sizes.values()) for r in refs[:1])

    with CheckpointManager.from_config(config) as ck:
        for step in range(crash_after):
            save(ck, step, _train_step(model, opt, sched))
    say(f"step {crash_after - 1}: [red]simulated crash[/red], the process state is gone")
    del model, opt, sched

    model, opt, sched = _setup(seed=123)  # fresh objects and generators; restore must overwrite them
    with CheckpointManager.from_config(config) as ck:
        restored = ck.restore(model=model, optimizer=opt,
                              extra={"lr_scheduler": sched}, rank_extra={"rng": rng})
        start = restored.step + 1 if restored else 0
        say(f"restored step {restored.step} from {restored.ref.uri}" if restored else "nothing to restore")
        for step in range(start, steps):
            loss = _train_step(model, opt, sched)
            save(ck, step, loss)
        published = ck.finalize(model=model, step=steps - 1, epoch=0, metrics={"loss": loss})
        kept = [r.step for r in ck.list_checkpoints()]
        run_id = ck.mlflow_run_id

    final_bytes = sum((published[0].sizes or {}).values()) if published else 0
    matches = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    summary = {
        "workdir": workdir,
        "steps": steps,
        "saves": len(saved_bytes),
        "crashed_after_step": crash_after - 1,
        "restored_step": restored.step if restored else None,
        "kept_checkpoints": sorted(kept),
        "resume_bytes_on_disk": _tree_bytes(os.path.join(workdir, "checkpoints")),
        "final_model": [r.uri for r in published],
        # What the tracking store holds: the final model once, against every checkpoint as well.
        "tracked_bytes": final_bytes,
        "tracked_bytes_if_every_checkpoint_were_logged": final_bytes + sum(saved_bytes),
        "final_loss": loss,
        "mlflow_run_id": run_id,
        "resumed_matches_uninterrupted": matches,
    }
    if console:
        table = Table(title="ckptkit demo summary", show_header=False)
        for k, v in summary.items():
            table.add_row(k.replace("_", " "), str(v))
        console.print(table)
        say("[green]resumed training is bit-identical to an uninterrupted run[/green]" if matches
            else "[red]resumed training differs from an uninterrupted run[/red]")
    return summary
