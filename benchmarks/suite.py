"""The speed suite: ckptkit against the plain ways of saving and loading the same state.

For each size (an AdamW training state: the model's weights and the optimizer's two moments,
about 12 bytes per parameter) it measures, in this one process, alternating the order of the
cases every round and taking medians:

* ``save``     ckptkit's sync save to a ``local`` backend against ``torch.save`` + fsync of the
               file, and against DCP ``save`` (single process, its own fsyncs), per folder;
* ``async``    how long an ``async: true, async_copy: blocking`` save blocks the caller, against
               a sync ckptkit save; and in a training loop, for each ``async_copy`` mode
               (``optimizer_state`` is the default), the save plus the wait at the next
               ``optimizer.step()``, what the loop's steps lose to the copy and the write, and
               to the making of the first save's buffers;
* ``first``    the first async save of a new training, from 100 MB up: each round a new
               process builds the model, a manager, restores (nothing yet), trains one step and
               saves at once, or trains two seconds more first (while the manager makes its
               buffers); held for the save plus the next step's wait, against a sync save;
               in the last folder only (tmpfs by default);
* ``restore``  ckptkit's restore (verify and load, model and optimizer) against ``torch.load``
               (``weights_only=True``) of the torch.save file and ``load_state_dict``;
* ``fresh``    the same restore as a resuming process makes it: each round a new process that
               holds the model and an optimizer that has not stepped yet restores once (the
               restores of ``restore`` reuse memory that the previous round freed, and find the
               optimizer's state there already);
* ``s3``       ckptkit's save to an ``s3`` backend against ``s3fs.put`` of the torch.save file,
               and against ``torch.save`` into ``io.BytesIO`` then one upload, all to one moto
               server that the suite starts on a free loopback port (sizes up to 256 MiB unless
               ``--s3-max-size`` says otherwise: moto holds every object in memory).

Each row also gives the peak resident memory a call added over what the process held before it,
as a multiple of the state's size (the kernel's high-water mark, reset before each call).

    python benchmarks/suite.py                               # 1 MB to 1 GiB, disk and tmpfs, S3
    python benchmarks/suite.py --sizes 1MB,10MB --no-s3 --json run.json
    python benchmarks/suite.py --json new.json --compare old.json   # ratios of two runs side by side

``tox -e bench`` runs it with its JSON in ``.tox/bench.json``. Figures on a shared machine are
noisy: compare ratios taken in the same run, and the load average that the JSON records.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import ckptkit
from ckptkit.plugins import make_plugin_manager

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moto_server import moto_server  # noqa: E402  (the benchmarks folder is no package)

UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
DEFAULT_SIZES = "1MB,10MB,100MB,1GiB"
# moto keeps every object in memory and joins multipart uploads there: at 1 GiB it took minutes
# and answered 500, so the S3 cases stop below that unless asked (bench_s3_save.py does 512 MiB).
DEFAULT_S3_MAX = "256MiB"
PARTS = ("save", "restore", "fresh", "async", "first", "s3")
BUCKET = "bench"
WIDTH = 1024
BATCH = 32  # rows of the forward and backward pass that the async_copy: background case runs
# Training before a first async save: a manager makes that save's buffers meanwhile. Trainers
# save after minutes; two seconds cover the buffers of 1 GiB on two busy cores.
FIRST_SAVE_AFTER_S = 2.0
PREPARING_STEPS = 5  # the steps timed beside the making of those buffers
# First async saves are timed in fresh processes (a process reuses memory that it freed, which
# a trainer's first save does not find), from this size up: below it the save's fixed costs,
# not the copy, make the time (the "async" rows show them).
DEFAULT_FIRST_MIN = "100MB"
FIRST_CASES = (("blocking", 0.0), ("optimizer_state", 0.0), ("background", 0.0), ("background", FIRST_SAVE_AFTER_S))
FIRST_NAMES = {"blocking": "async first save", "optimizer_state": "async default first save",
               "background": "async background first save"}


def parse_size(text: str) -> int:
    t = text.strip().upper()
    for unit in sorted(UNITS, key=len, reverse=True):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * UNITS[unit])
    return int(t)


def size_label(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("GB", 10**9), ("MB", 10**6)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n / 1e6:g} MB"


def default_rounds(size: int, remote: bool) -> int:
    """Many rounds where a round is cheap, so that medians settle; few where it takes seconds."""
    table = [(2 * 10**6, 15), (20 * 10**6, 9), (200 * 10**6, 5), (float("inf"), 3)]
    rounds = next(r for limit, r in table if size <= limit)
    return max(2, rounds * 2 // 3) if remote else rounds


# -- the state ------------------------------------------------------------------------------

def build(size: int, fresh: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model and an AdamW optimizer after one step: weights + two moments = ``size`` bytes.

    ``fresh``: what a resuming process holds before it restores: the same model, its memory
    written once (zeros), and an optimizer that has not stepped."""
    params = max(WIDTH, size // 12)
    rows = max(1, params // WIDTH)
    per_layer = max(1, min(rows, 4096))  # layers of at most 16 MiB each, as a real model has many
    device = "meta" if fresh else None
    layers = [nn.Linear(WIDTH, min(per_layer, rows - i), bias=False, device=device) for i in range(0, rows, per_layer)]
    torch.manual_seed(0)
    model = nn.Sequential(*layers) if len(layers) > 1 else layers[0]
    if fresh:
        model = model.to_empty(device="cpu")
        for p in model.parameters():
            p.detach().zero_()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        nn.init.normal_(p)  # random values: every page resident, nothing compresses
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    for p in model.parameters():
        p.grad = None  # gradients are not part of a checkpoint and would double the memory
    return model, opt


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    n = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for s in opt.state.values():
        n += sum(t.numel() * t.element_size() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    return n


def plain_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


# -- measuring ------------------------------------------------------------------------------

def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # Linux: restart VmHWM from the current RSS
        f.write("5")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def measure(fn: Callable[[], Any]) -> tuple[float, int]:
    """Wall seconds of ``fn()`` and the peak RSS it added over the RSS before it."""
    try:
        _reset_peak()
        before = _status("VmRSS:")
    except OSError:
        before = 0
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    peak = _status("VmHWM:") - before if before else 0
    return elapsed, max(0, peak)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Case:
    """One way of doing something: ``run`` is timed; ``clean`` (untimed) undoes it before the next round."""

    def __init__(self, name: str, run: Callable[[], Any], clean: Callable[[], Any] = lambda: None):
        self.name, self.run, self.clean = name, run, clean
        self.times: list[float] = []
        self.peaks: list[int] = []


def race(cases: list[Case], rounds: int, warmup: bool = True) -> None:
    """Run every case ``rounds`` times, alternating their order, after one untimed warm-up each."""
    if warmup:
        for c in cases:
            c.run()
            c.clean()
    # Gigabytes that earlier comparisons left dirty in the page cache would otherwise be written
    # back during whichever case runs first.
    os.sync()
    for r in range(rounds):
        for c in cases if r % 2 == 0 else cases[::-1]:
            t, peak = measure(c.run)
            c.times.append(t)
            c.peaks.append(peak)
            c.clean()


# -- the comparisons ----------------------------------------------------------------------

def local_manager(folder: str, is_async: bool = False, keep_last: int = 2,
                  async_copy: str | None = None) -> ckptkit.CheckpointManager:
    """A manager on a local folder; ``async_copy`` None leaves it to the config's default."""
    resume = {"backends": ["disk"], "every_n_steps": 1, "keep_last": keep_last, "async": is_async}
    if async_copy is not None:
        resume["async_copy"] = async_copy
    return ckptkit.CheckpointManager.from_config(
        {"backends": {"disk": {"type": "local", "path": folder}}, "roles": {"resume": resume}},
        run_name="bench", plugin_manager=make_plugin_manager(autoload=False))


def row(size: int, where: str, what: str, baseline: Case, ours: Case, note: str = "") -> dict[str, Any]:
    b, o = statistics.median(baseline.times), statistics.median(ours.times)
    return {
        "state_bytes": size, "where": where, "what": what, "baseline": baseline.name, "case": ours.name,
        "baseline_s": b, "ckptkit_s": o, "ratio": o / b if b else None,
        "baseline_times": baseline.times, "ckptkit_times": ours.times,
        "baseline_peak": max(baseline.peaks, default=0) / size, "ckptkit_peak": max(ours.peaks, default=0) / size,
        "note": note,
    }


def local_suite(size: int, folder: str, rounds: int, model, opt, parts: set[str] = frozenset(PARTS)
                ) -> list[dict[str, Any]]:
    import torch.distributed.checkpoint as dcp

    work = tempfile.mkdtemp(prefix="ckptkit-suite-", dir=folder)
    where = "tmpfs" if folder.startswith("/dev/shm") else f"disk ({folder})"
    try:
        plain = os.path.join(work, "plain.pt")
        dcp_dir = os.path.join(work, "dcp")
        ck = local_manager(os.path.join(work, "ck"))
        step = iter(range(10**9))

        def torch_save():
            torch.save(plain_state(model, opt), plain)
            fsync_path(plain)

        def dcp_save():
            with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp.save(plain_state(model, opt), checkpoint_id=dcp_dir)

        ts = Case("torch.save+fsync", torch_save)
        dc = Case("DCP save", dcp_save, lambda: shutil.rmtree(dcp_dir, ignore_errors=True))
        # The prune after a save (keep_last) runs on a thread once the save has returned, and is
        # settled between rounds, untimed: in training, steps pass between two saves. Two saves
        # back to back (the alternating order puts ours last, then first) would time the second
        # waiting for the first's prune. What the prune costs is the "save+prune" row.
        ours = Case("ckptkit save", lambda: ck.save(step=next(step), model=model, optimizer=opt), ck.wait)
        whole = local_manager(os.path.join(work, "whole"))

        def save_and_prune():
            whole.save(step=next(step), model=model, optimizer=opt)
            whole.wait()

        both = Case("ckptkit save+prune", save_and_prune)
        rows: list[dict[str, Any]] = []
        if "save" in parts:
            race([ts, dc, ours, both], rounds)
            rows += [row(size, where, "save", ts, ours), row(size, where, "save vs DCP", dc, ours),
                     row(size, where, "save+prune", ts, both, "the save, then the prune it starts, both waited for")]
        else:
            ours.run()  # something to restore
        whole.close()
        # Each folder goes once its case is done: on tmpfs at 1 GiB they were memory enough
        # (16 GiB together) for the kernel to kill the suite.
        shutil.rmtree(os.path.join(work, "whole"), ignore_errors=True)
        if not parts & {"restore", "async"}:
            ck.close()
            return rows

        # Restore: both read files that were just written (page cache warm for both).
        torch_save()

        def torch_load():
            sd = torch.load(plain, weights_only=True)
            model.load_state_dict(sd["model"])
            opt.load_state_dict(sd["optimizer"])

        tl = Case("torch.load+load_state_dict", torch_load)
        cr = Case("ckptkit restore", lambda: ck.restore(model=model, optimizer=opt))
        if "restore" in parts:
            race([tl, cr], rounds)
            rows.append(row(size, where, "restore", tl, cr, "verifies every byte, then loads"))
        ck.close()
        shutil.rmtree(os.path.join(work, "ck"), ignore_errors=True)
        os.remove(plain)
        if "async" not in parts:
            return rows

        # Async: how long the caller is held, against a sync save of the same state.
        sync_ck = local_manager(os.path.join(work, "sync"), keep_last=1)
        async_ck = local_manager(os.path.join(work, "async"), is_async=True, keep_last=1, async_copy="blocking")
        # The sync save's prune runs on a thread after it returns; waited for between rounds, so
        # that it does not compete with the async case's timing for the interpreter lock.
        sync_case = Case("ckptkit sync save", lambda: sync_ck.save(step=next(step), model=model, optimizer=opt),
                         sync_ck.wait)
        async_ck.save(step=next(step), model=model, optimizer=opt)  # makes the buffers: see the "first" part
        async_ck.wait()
        blocked = Case("async save, blocked", lambda: async_ck.save(step=next(step), model=model, optimizer=opt),
                       async_ck.wait)
        race([sync_case, blocked], rounds)
        rows.append(row(size, where, "async blocking", sync_case, blocked, "the write goes on in the background"))
        async_ck.close()
        shutil.rmtree(os.path.join(work, "async"), ignore_errors=True)
        rows += background_rows(size, where, work, rounds, model, opt, sync_case, step)
        sync_ck.close()
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def train_pass(model: nn.Module, batch: torch.Tensor) -> None:
    """A forward and backward pass over every layer: the training work between two steps."""
    layers = list(model) if isinstance(model, nn.Sequential) else [model]
    sum(layer(batch).pow(2).mean() for layer in layers).backward()


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> float:
    """Seconds that ``steps`` training steps (pass and optimizer step) took."""
    batch = torch.randn(BATCH, WIDTH)
    start = time.perf_counter()
    for _ in range(steps):
        train_pass(model, batch)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def train_for(model: nn.Module, opt: torch.optim.Optimizer, seconds: float) -> int:
    """Train for ``seconds`` and at least 3 steps, as a trainer does before its first save; the
    number of steps."""
    start, steps = time.perf_counter(), 0
    while steps < 3 or time.perf_counter() - start < seconds:
        train_steps(model, opt, 1)
        steps += 1
    return steps


def held_at_step(opt: torch.optim.Optimizer) -> float:
    """Seconds that ``opt.step()`` waited before its own work began (a step pre-hook registered
    after ckptkit's takes the time)."""
    started: list[float] = []
    handle = register_optimizer_step_pre_hook(lambda *_: started.append(time.perf_counter()))
    start = time.perf_counter()
    try:
        opt.step()
    finally:
        handle.remove()
    return started[0] - start


def background_rows(size: int, where: str, work: str, rounds: int, model, opt, sync_case: Case,
                    step: Any) -> list[dict[str, Any]]:
    """``async_copy: background``, in a training loop: save, a forward and backward pass of
    ``BATCH`` rows (the copy runs beside it), then ``optimizer.step()``, which waits for the copy.
    The caller is held for the save plus that wait, timed by a step pre-hook registered after
    ckptkit's. The loop's steps (pass and optimizer step, save left out) are also timed against
    the same steps with no save in flight: what the copy and the write take from training."""
    batch = torch.randn(BATCH, WIDTH)

    def loop(ck: ckptkit.CheckpointManager | None, held: Case, steps: Case) -> None:
        start = time.perf_counter()
        if ck is not None:
            ck.save(step=next(step), model=model, optimizer=opt)
        saved = time.perf_counter()
        train_pass(model, batch)
        wait = held_at_step(opt)
        steps.times.append(time.perf_counter() - saved)
        held.times.append(saved - start + wait)
        opt.zero_grad(set_to_none=True)
        if ck is not None:
            ck.wait()  # untimed: steps pass between two saves

    # What making the first save's buffers (from restore on, the optimizer holding state already)
    # takes from the steps that run beside it, against the same steps before that manager existed.
    alone = Case(f"{PREPARING_STEPS} steps, nothing in flight", lambda: None)
    alone.times.append(train_steps(model, opt, PREPARING_STEPS))
    bg = local_manager(os.path.join(work, "background"), is_async=True, keep_last=1, async_copy="background")
    bg.restore(model=model, optimizer=opt)  # nothing there yet
    preparing = Case(f"{PREPARING_STEPS} steps after restore", lambda: None)
    preparing.times.append(train_steps(model, opt, PREPARING_STEPS))
    held, steps = Case("async background, held", lambda: None), Case("steps beside the copy", lambda: None)
    held_b, steps_b = Case("async blocking, held", lambda: None), Case("steps beside the write", lambda: None)
    held_d, steps_d = Case("async default, held", lambda: None), Case("steps beside the copy", lambda: None)
    plain_held, plain = Case("", lambda: None), Case("steps, no save in flight", lambda: None)
    blocking = default = None
    try:
        blocking = local_manager(os.path.join(work, "blocking"), is_async=True, keep_last=1, async_copy="blocking")
        default = local_manager(os.path.join(work, "default"), is_async=True, keep_last=1)
        cases = {bg: (held, steps), blocking: (held_b, steps_b), default: (held_d, steps_d), None: (plain_held, plain)}
        order = (bg, default, blocking, None)
        for ck in order:  # warm-ups
            loop(ck, Case("", lambda: None), Case("", lambda: None))
        for r in range(rounds):
            for ck in order if r % 2 == 0 else order[::-1]:
                loop(ck, *cases[ck])
    finally:
        for ck in (bg, blocking, default):
            if ck is not None:
                ck.close()
        for name in ("background", "blocking", "default"):
            shutil.rmtree(os.path.join(work, name), ignore_errors=True)
    note = f"save + optimizer.step()'s wait, a {BATCH}-row forward and backward pass between"
    return [row(size, where, "async background held", sync_case, held, note),
            row(size, where, "steps beside first buffers", alone, preparing,
                f"{PREPARING_STEPS} steps after the manager's restore, against the same before it"),
            row(size, where, "async blocking held, loop", sync_case, held_b, note),
            row(size, where, "async default held, loop", sync_case, held_d,
                note + " (async_copy: optimizer_state, the default)"),
            row(size, where, "steps beside background copy", plain, steps,
                "pass + optimizer step, with the copy and the write in flight"),
            row(size, where, "steps beside blocking async", plain, steps_b,
                "pass + optimizer step, with the write in flight"),
            row(size, where, "steps beside default async", plain, steps_d,
                "pass + optimizer step, with the optimizer state's copy and the write in flight")]


def first_suite(size: int, folder: str, rounds: int, model, opt) -> list[dict[str, Any]]:
    """Each round, a new process per case builds the model and optimizer, then a manager, restores
    (nothing there yet), trains one step (or that and ``FIRST_SAVE_AFTER_S`` seconds more), and
    saves: the first save holds training for the save plus the next step's wait, against a sync
    save of the same state made here."""
    work = tempfile.mkdtemp(prefix="ckptkit-suite-first-", dir=folder)
    where = "tmpfs" if folder.startswith("/dev/shm") else f"disk ({folder})"
    try:
        sync_ck = local_manager(os.path.join(work, "sync"))
        steps = iter(range(10**9))
        sync_case = Case("ckptkit sync save", lambda: sync_ck.save(step=next(steps), model=model, optimizer=opt),
                         sync_ck.wait)
        race([sync_case], rounds)
        sync_ck.close()
        cases = {c: Case(f"{c[0]}:{c[1]}", lambda: None) for c in FIRST_CASES}
        for r in range(rounds):
            for c in FIRST_CASES if r % 2 == 0 else FIRST_CASES[::-1]:
                res = subprocess.run([sys.executable, os.path.abspath(__file__), "--first-child", cases[c].name,
                                      "--sizes", str(size), "--dir", work], capture_output=True, text=True)
                if res.returncode:
                    raise RuntimeError(f"first save, {c}: {res.stderr.strip().splitlines()[-1:]}")
                cases[c].times.append(float(res.stdout.strip().splitlines()[-1]))
        rows = []
        for (mode, after), case in cases.items():
            what = FIRST_NAMES[mode]
            when = f"after {after:g} s of training" if after else "at the first step"
            rows.append(row(size, where, f"{what}, {'trained' if after else 'at once'}", sync_case, case,
                            f"a new process each round, {when} after restore()"))
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def first_child(case: str, size: int, work: str) -> float:
    """Seconds that the first save of a new training held it, in this fresh process."""
    mode, after = case.split(":")
    model, opt = build(size, fresh=True)  # an optimizer without state: its first step makes it
    folder = os.path.join(work, f"first-{os.getpid()}")
    ck = local_manager(folder, is_async=True, async_copy=mode)
    ck.restore(model=model, optimizer=opt)  # nothing to restore: a new training
    train_steps(model, opt, 1)
    if float(after):
        train_for(model, opt, float(after))
    batch = torch.randn(BATCH, WIDTH)
    start = time.perf_counter()
    ck.save(step=0, model=model, optimizer=opt)
    saved = time.perf_counter()
    train_pass(model, batch)
    held = saved - start + held_at_step(opt)
    ck.wait()
    ck.close()
    shutil.rmtree(folder, ignore_errors=True)
    return held


def fresh_suite(size: int, folder: str, rounds: int, model, opt) -> list[dict[str, Any]]:
    """Each round, a new process per case restores the files written here once (page cache warm
    for both), into a model and an optimizer that has not stepped, as a resuming process does."""
    work = tempfile.mkdtemp(prefix="ckptkit-suite-fresh-", dir=folder)
    where = "tmpfs" if folder.startswith("/dev/shm") else f"disk ({folder})"
    try:
        torch.save(plain_state(model, opt), os.path.join(work, "plain.pt"))
        ck = local_manager(os.path.join(work, "ck"))
        ck.save(step=0, model=model, optimizer=opt)
        ck.close()
        tl, cr = Case("torch.load+load_state_dict", lambda: None), Case("ckptkit restore", lambda: None)
        for r in range(rounds):
            for case in (tl, cr) if r % 2 == 0 else (cr, tl):
                res = subprocess.run([sys.executable, os.path.abspath(__file__), "--restore-child", case.name,
                                      "--sizes", str(size), "--dir", work], capture_output=True, text=True)
                if res.returncode:
                    raise RuntimeError(f"fresh restore, {case.name}: {res.stderr.strip().splitlines()[-1:]}")
                case.times.append(float(res.stdout.strip().splitlines()[-1]))
        return [row(size, where, "restore, fresh process", tl, cr, "a new process, an optimizer not yet stepped")]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def restore_child(case: str, size: int, work: str) -> float:
    """Seconds that one restore of ``case`` took in this fresh process."""
    model, opt = build(size, fresh=True)
    ck = local_manager(os.path.join(work, "ck")) if case == "ckptkit restore" else None
    return timed_restore(model, opt, os.path.join(work, "plain.pt"), ck)


def timed_restore(model: nn.Module, opt: torch.optim.Optimizer, plain: str,
                  ck: ckptkit.CheckpointManager | None) -> float:
    """Seconds of ``ck.restore``, or with no ``ck`` of torch.load of ``plain`` and load_state_dict."""
    start = time.perf_counter()
    if ck is None:
        sd = torch.load(plain, weights_only=True)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optimizer"])
    else:
        ck.restore(model=model, optimizer=opt)
    return time.perf_counter() - start


def s3_suite(size: int, endpoint: str, rounds: int, model, opt, scratch: str) -> list[dict[str, Any]]:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    pm = make_plugin_manager(autoload=False)
    pm.load_backend_entrypoints(only_dist="ckptkit-s3")
    tag = f"{size}"
    ck = ckptkit.CheckpointManager.from_config({
        "backends": {"s3": {"type": "s3", "path": f"s3://{BUCKET}/ck-{tag}", "storage_options": {"endpoint_url": endpoint}}},
        "roles": {"resume": {"backends": ["s3"], "every_n_steps": 1, "keep_last": 2}},
    }, run_name="bench", plugin_manager=pm)
    plain = os.path.join(scratch, f"plain-{tag}.pt")
    torch.save(plain_state(model, opt), plain)
    step = iter(range(10**9))

    def bytesio():
        buf = io.BytesIO()
        torch.save(plain_state(model, opt), buf)
        with fs.open(f"{BUCKET}/bytesio-{tag}", "wb") as f:
            f.write(buf.getbuffer())

    put = Case("s3fs.put of the torch.save file", lambda: fs.put(plain, f"{BUCKET}/put-{tag}"))
    bio = Case("torch.save to BytesIO, upload", bytesio)
    ours = Case("ckptkit save (s3)", lambda: ck.save(step=next(step), model=model, optimizer=opt))
    try:
        race([put, bio, ours], rounds)
    finally:
        ck.close()
        os.remove(plain)
    return [row(size, "s3 (moto)", "save vs put", put, ours, "put leaves out serialising"),
            row(size, "s3 (moto)", "save vs BytesIO", bio, ours)]


# -- memory, each case in a fresh process ---------------------------------------------------

MEMORY_CASES = ("torch.save+fsync", "DCP save", "torch.save to BytesIO", "ckptkit save", "ckptkit async save",
                "torch.load+load_state_dict", "ckptkit restore")


def memory_child(case: str, size: int, folder: str) -> dict[str, Any]:
    """One call of ``case`` in this fresh process: the peak RSS it added over the RSS before it."""
    import torch.distributed.checkpoint as dcp

    model, opt = build(size)
    work = tempfile.mkdtemp(prefix="ckptkit-suite-mem-", dir=folder)
    plain = os.path.join(work, "plain.pt")
    try:
        ck = local_manager(os.path.join(work, "ck"), is_async=case == "ckptkit async save")
        if case == "torch.load+load_state_dict":
            torch.save(plain_state(model, opt), plain)  # streams: adds next to nothing
        elif case == "ckptkit restore":
            ck.save(step=0, model=model, optimizer=opt)
        if case in ("torch.load+load_state_dict", "ckptkit restore"):
            del model, opt
            model, opt = build(size, fresh=True)  # restored into as a resuming process holds them
        calls = {
            "torch.save+fsync": lambda: (torch.save(plain_state(model, opt), plain), fsync_path(plain)),
            "DCP save": lambda: dcp.save(plain_state(model, opt), checkpoint_id=os.path.join(work, "dcp")),
            "torch.save to BytesIO": lambda: torch.save(plain_state(model, opt), io.BytesIO()),
            "ckptkit save": lambda: ck.save(step=1, model=model, optimizer=opt),
            "ckptkit async save": lambda: (ck.save(step=1, model=model, optimizer=opt), ck.wait()),
            "torch.load+load_state_dict": lambda: (model.load_state_dict((sd := torch.load(plain, weights_only=True))["model"]),
                                                   opt.load_state_dict(sd["optimizer"])),
            "ckptkit restore": lambda: ck.restore(model=model, optimizer=opt),
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            _, peak = measure(calls[case])
        ck.close()
        return {"case": case, "peak_added": peak, "state_bytes": state_bytes(model, opt)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure_memory(size: int, folder: str) -> list[dict[str, Any]]:
    out = []
    for case in MEMORY_CASES:
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", case,
                              "--sizes", str(size), "--dir", folder], capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"memory of {case}: {res.stderr.strip().splitlines()[-1:]}")
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def print_memory(memory: list[dict[str, Any]], label: str, folder: str) -> None:
    print(f"\npeak resident memory a call added, {label} state into {folder}, each in a fresh process "
          "(a multiple of the state's size S)")
    for m in memory:
        print(f"  {m['case']:28} {m['peak_added'] / m['state_bytes']:5.2f} S")


# -- output --------------------------------------------------------------------------------

def fmt_s(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def print_table(rows: list[dict[str, Any]], previous: dict[tuple, float] | None = None) -> None:
    head = ["size", "where", "what", "baseline", "baseline", "ckptkit", "ratio", "peak RSS/S b|ck"]
    if previous:
        head.append("ratio before")
    lines = [head]
    for r in rows:
        line = [r["label"], r["where"], r["what"], r["baseline"], fmt_s(r["baseline_s"]),
                fmt_s(r["ckptkit_s"]), f"{r['ratio']:.2f}", f"{r['baseline_peak']:.2f} | {r['ckptkit_peak']:.2f}"]
        if previous:
            old = previous.get((r["label"], r["where"], r["what"]))
            line.append("" if old is None else f"{old:.2f}")
        lines.append(line)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    for n, line in enumerate(lines):
        print("  ".join(str(c).ljust(w) if i < 4 else str(c).rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print("ratio: ckptkit's median time / the baseline's (below 1: ckptkit is faster); peak RSS/S: the "
          "most resident memory a call added, as a multiple of the state's size S")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--dir", action="append",
                        help="a folder for the local cases, repeatable (default: the temp folder on disk, and /dev/shm)")
    parser.add_argument("--rounds", type=int, help="timed rounds per case (default: 15 at 1 MB down to 3 at 1 GiB)")
    parser.add_argument("--no-s3", action="store_true", help="leave out the S3 cases")
    parser.add_argument("--s3-max-size", default=DEFAULT_S3_MAX,
                        help=f"the S3 cases run for sizes up to this (default {DEFAULT_S3_MAX})")
    parser.add_argument("--no-local", action="store_true", help="leave out the local cases")
    parser.add_argument("--memory-size", default="1GiB",
                        help="the size at which each case's peak memory is measured in a fresh process "
                             "(default 1GiB; 0 leaves it out)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--restore-child", help=argparse.SUPPRESS)
    parser.add_argument("--first-child", help=argparse.SUPPRESS)
    parser.add_argument("--first-min-size", default=DEFAULT_FIRST_MIN,
                        help=f"the first async saves in fresh processes run from this size up (default {DEFAULT_FIRST_MIN})")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts to run, of {', '.join(PARTS)} (default all)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    parser.add_argument("--compare", metavar="PATH", help="a previous run's JSON: show its ratios beside these")
    args = parser.parse_args(argv)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    folders = args.dir or [tempfile.gettempdir()] + (["/dev/shm"] if os.path.isdir("/dev/shm") else [])
    child = None
    if args.memory_child:
        child = json.dumps(memory_child(args.memory_child, sizes[0], folders[0]))
    elif args.restore_child:
        child = str(restore_child(args.restore_child, sizes[0], folders[0]))
    elif args.first_child:
        child = str(first_child(args.first_child, sizes[0], folders[0]))
    if child is not None:
        print(child, flush=True)
        # A child's answer is printed: skip freeing gigabytes one tensor at a time at exit (about a
        # second at 1 GiB, for each of the suite's dozens of children).
        os._exit(0)
    meta = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit(),
        "torch": torch.__version__, "ckptkit": ckptkit.__version__, "python": platform.python_version(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_before": load_average(),
        "argv": sys.argv[1:],
    }
    print(f"torch {meta['torch']}, ckptkit {meta['ckptkit']}, {meta['cpus']} CPUs, "
          f"load average {meta['load_before']}", flush=True)
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    wall = time.perf_counter()

    def attempt(what: str, fn: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        # One comparison that fails (a server that gives up, a full disk) leaves the others' rows.
        try:
            found = fn()
        except Exception as exc:
            errors.append(f"{what}: {type(exc).__name__}: {exc}")
            print(f"  {what}: FAILED, {errors[-1]}", flush=True)
            return []
        print(f"  {what}: done ({time.perf_counter() - wall:.0f} s)", flush=True)
        return found

    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    if parts - set(PARTS):
        parser.error(f"--only: unknown parts {', '.join(sorted(parts - set(PARTS)))}; choose from {', '.join(PARTS)}")
    stack = moto_server() if not args.no_s3 and "s3" in parts else None
    endpoint = stack.__enter__() if stack is not None else None
    scratch = tempfile.mkdtemp(prefix="ckptkit-suite-")
    try:
        for size in sizes:
            model, opt = build(size)
            actual = state_bytes(model, opt)
            found: list[dict[str, Any]] = []
            for folder in [] if args.no_local or not parts - {"s3", "fresh", "first"} else folders:
                found += attempt(f"{size_label(size)} in {folder}", lambda: local_suite(
                    actual, folder, args.rounds or default_rounds(size, False), model, opt, parts))
            for folder in [] if args.no_local or "fresh" not in parts else folders:
                # Three rounds: each one starts two processes (about two seconds each, importing torch).
                found += attempt(f"{size_label(size)} in {folder}, fresh processes", lambda: fresh_suite(
                    actual, folder, args.rounds or 3, model, opt))
            # In the last folder only (tmpfs where there is one): what holds a first save is paging
            # in new memory, the same in every folder, and tmpfs's sync save is the shortest baseline.
            for folder in [] if args.no_local or "first" not in parts or size < parse_size(args.first_min_size) \
                    else folders[-1:]:
                found += attempt(f"{size_label(size)} in {folder}, first saves in fresh processes", lambda: first_suite(
                    actual, folder, args.rounds or 3, model, opt))
            if endpoint is not None and size <= parse_size(args.s3_max_size):
                found += attempt(f"{size_label(size)} to S3", lambda: s3_suite(
                    actual, endpoint, args.rounds or default_rounds(size, True), model, opt, scratch))
            rows += [dict(r, label=size_label(size)) for r in found]
            del model, opt
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if stack is not None:
            stack.__exit__(None, None, None)
    memory: list[dict[str, Any]] = []
    memory_size = parse_size(args.memory_size)
    if memory_size:
        memory = attempt(f"memory at {size_label(memory_size)}", lambda: measure_memory(memory_size, folders[0]))
    meta["load_after"] = load_average()
    meta["errors"] = errors
    meta["peak_rss_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    meta["seconds"] = round(time.perf_counter() - wall, 1)
    previous = None
    if args.compare:
        with open(args.compare) as f:
            previous = {(r["label"], r["where"], r["what"]): r["ratio"] for r in json.load(f)["rows"]}
    print()
    print_table(rows, previous)
    if memory:
        print_memory(memory, size_label(memory_size), folders[0])
    print(f"load average before {meta['load_before']}, after {meta['load_after']}; {meta['seconds']} s in all")
    for e in errors:
        print(f"FAILED {e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "memory": memory}, f, indent=1)
        print(f"written to {args.json}")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
