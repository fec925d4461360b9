"""Save throughput and peak memory of ckptkit's local backend against a bare torch.save.

Three cases save the same model state into the same folder:

* ``torch.save``: ``torch.save(state, path)`` then an fsync of the file, the floor that any
  durable save pays;
* ``torch.save-nocrc``: the same without torch's per-record crc32, which ckptkit also skips
  because it checksums the whole stream itself;
* ``ckptkit``: ``CheckpointManager.save`` to a ``local`` backend (temporary folder, streamed
  xxh3-128, manifest, fsync of files and folders, rename, then a prune that keeps everything).

Timing runs both cases in one process, alternating their order each round, and reports the
median of the rounds; ratios are taken within the run because absolute figures on a shared
machine drift. Peak memory is measured in a fresh subprocess per case, since ``ru_maxrss`` is
a lifetime maximum.

    python benchmarks/bench_local_save.py                       # 1 GiB, a temp folder on disk
    python benchmarks/bench_local_save.py --dir /var/tmp --dir /dev/shm --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

import ckptkit
from ckptkit.plugins import make_plugin_manager

WIDTH = 2048  # one Linear layer holds WIDTH * (WIDTH + 1) float32 values, about 16 MiB
CASES = ("torch.save", "torch.save-nocrc", "ckptkit")


def build_model(size_gib: float) -> nn.Module:
    layers = max(1, round(size_gib * 2**30 / (WIDTH * (WIDTH + 1) * 4)))
    torch.manual_seed(0)
    # Random values, so every page is really resident and nothing compresses or dedups.
    return nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(layers)))


def state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class Saver:
    """Runs one case into ``folder``; ``clean`` removes what it wrote, outside the timing."""

    def __init__(self, case: str, model: nn.Module, folder: str):
        self.case, self.model, self.folder = case, model, folder
        self.step = 0
        if case == "ckptkit":
            self.manager = ckptkit.CheckpointManager.from_config(
                {
                    "backends": {"scratch": {"type": "local", "path": folder}},
                    "roles": {"resume": {"backends": ["scratch"], "every_n_steps": 1, "keep_last": 1000}},
                },
                run_name="bench",
                plugin_manager=make_plugin_manager(autoload=False),  # local only: no other plugins
            )

    def save(self) -> None:
        if self.case.startswith("torch.save"):
            path = os.path.join(self.folder, "plain.pt")
            # The -nocrc baseline skips torch's per-record crc32, as ckptkit's save does (it
            # checksums the whole stream itself), so the comparison without it is like for like.
            torch.serialization.set_crc32_options(self.case == "torch.save")
            try:
                torch.save({"model": self.model.state_dict()}, path)
            finally:
                torch.serialization.set_crc32_options(True)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            self.manager.save(step=self.step, model=self.model, force=True)
        self.step += 1

    def clean(self) -> None:
        if self.case.startswith("torch.save"):
            os.remove(os.path.join(self.folder, "plain.pt"))
        else:
            shutil.rmtree(os.path.join(self.folder, "bench"))

    def close(self) -> None:
        if self.case == "ckptkit":
            self.manager.close()


def time_cases(model: nn.Module, folder: str, rounds: int) -> tuple[dict, dict]:
    """Wall-clock and CPU seconds (all threads of this process) of each round, per case."""
    savers = {c: Saver(c, model, tempfile.mkdtemp(prefix=f"{c}-", dir=folder)) for c in CASES}
    times: dict[str, list[float]] = {c: [] for c in CASES}
    cpu: dict[str, list[float]] = {c: [] for c in CASES}
    for saver in savers.values():  # untimed: first-call imports and allocations
        saver.save()
        saver.clean()
    for r in range(rounds):
        for case in CASES if r % 2 == 0 else reversed(CASES):
            saver = savers[case]
            os.sync()  # start each save with no one else's dirty pages in the way
            start, start_cpu = time.perf_counter(), time.process_time()
            saver.save()
            times[case].append(time.perf_counter() - start)
            cpu[case].append(time.process_time() - start_cpu)
            saver.clean()
    for saver in savers.values():
        saver.close()
        os.rmdir(saver.folder)
    return times, cpu


def child(case: str, folder: str, size_gib: float) -> None:
    """One save in this fresh process; print its memory figures as JSON."""
    base = rss_bytes()
    model = build_model(size_gib)
    gc.collect()
    before = rss_bytes()
    saver = Saver(case, model, tempfile.mkdtemp(prefix=f"mem-{case}-", dir=folder))
    saver.save()
    saver.clean()
    saver.close()
    os.rmdir(saver.folder)
    print(json.dumps({"state": state_bytes(model), "base": base, "before": before, "peak": peak_rss_bytes()}))


def measure_memory(case: str, folder: str, size_gib: float) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", case, "--dir", folder, "--size-gib", str(size_gib)],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(folder: str, size: int, times: dict, cpu: dict, memory: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    median = {c: statistics.median(times[c]) for c in CASES}
    table = Table(title=f"{size / 2**30:.2f} GiB state into {folder} (median of {len(times['ckptkit'])} rounds)")
    for col in ("case", "s", "rounds", "MB/s", "ratio", "CPU s", "peak/S", "(peak-base)/S", "save Δ/S"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for case in CASES:
        m = memory[case]
        table.add_row(
            case,
            f"{median[case]:.2f}",
            " ".join(f"{t:.2f}" for t in times[case]),
            f"{size / median[case] / 1e6:.0f}",
            f"{median['torch.save'] / median[case]:.2f}",
            f"{statistics.median(cpu[case]):.2f}",
            f"{m['peak'] / size:.2f}",
            f"{(m['peak'] - m['base']) / size:.2f}",
            f"{(m['peak'] - m['before']) / size:.2f}",
        )
    console = Console()
    if not console.is_terminal:
        console.width = 120
    console.print(table)
    print("ratio: torch.save's median time / this case's; CPU s: median CPU time of the process, "
          "all threads; S: the state's size; base: RSS once torch and ckptkit are imported; "
          "save Δ: peak RSS minus RSS just before the save")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="size of the state (default 1)")
    parser.add_argument("--dir", action="append",
                        help="folder to save into, repeatable (default: a temp folder on disk)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per case (default 3)")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    folders = args.dir or [tempfile.gettempdir()]
    if args.child:
        return child(args.child, folders[0], args.size_gib)

    model = build_model(args.size_gib)
    size = state_bytes(model)
    print(f"torch {torch.__version__}, ckptkit {ckptkit.__version__}, {os.cpu_count()} CPUs")
    for folder in folders:
        times, cpu = time_cases(model, folder, args.rounds)
        memory = {c: measure_memory(c, folder, args.size_gib) for c in CASES}
        report(folder, size, times, cpu, memory)


if __name__ == "__main__":
    main()
