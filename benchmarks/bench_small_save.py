"""The fixed costs of a small save: what the caller waits for, and what the save costs in all.

For each size and folder, one process times, in turns (the order alternating every round, after
a few untimed rounds):

* ``torch.save+fsync``: ``torch.save`` of the model and optimizer state, then an fsync;
* ``save``: ``CheckpointManager.save`` to a ``local`` backend (keep_last 2, so every save also
  prunes one), the time until it returns;
* ``save+prune``: the same, then ``wait()``, which returns once the prune after the save is done:
  the whole cost of a save, where ``save`` is what a training loop waits for.

The state is the suite's AdamW state (``benchmarks/suite.py``). Ratios are taken against the
baseline of the same run; compare them, and the load average printed with them.

    python benchmarks/bench_small_save.py                         # 1 MB, tmpfs and a temp folder on disk
    python benchmarks/bench_small_save.py --sizes 1MB,10MB --rounds 400 --dir /dev/shm
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suite import build, fsync_path, local_manager, parse_size, plain_state  # noqa: E402


def measure(size: int, folder: str, rounds: int) -> dict[str, float]:
    model, opt = build(size)
    work = tempfile.mkdtemp(prefix="ckptkit-small-", dir=folder)
    try:
        returns, whole = local_manager(os.path.join(work, "a")), local_manager(os.path.join(work, "b"))
        plain = os.path.join(work, "plain.pt")
        step = iter(range(10**9))

        def baseline() -> None:
            torch.save(plain_state(model, opt), plain)
            fsync_path(plain)

        def save_and_prune() -> None:
            whole.save(step=next(step), model=model, optimizer=opt)
            whole.wait()

        cases = {"torch.save+fsync": baseline,
                 "save": lambda: returns.save(step=next(step), model=model, optimizer=opt),
                 "save+prune": save_and_prune}
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(5):
            for run in cases.values():
                run()
        order = list(cases)
        for r in range(rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                cases[name]()
                times[name].append(time.perf_counter() - start)
        returns.close()
        whole.close()
        return {name: statistics.median(t) for name, t in times.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1MB", help="comma-separated state sizes (default 1MB)")
    parser.add_argument("--dir", action="append", help="a folder to save into, repeatable "
                                                       "(default: /dev/shm and the temp folder)")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    folders = args.dir or [d for d in ("/dev/shm", tempfile.gettempdir()) if os.path.isdir(d)]
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for size in map(parse_size, args.sizes.split(",")):
        for folder in folders:
            med = measure(size, folder, args.rounds)
            base = med["torch.save+fsync"]
            print(f"{size / 1e6:g} MB in {folder}: torch.save+fsync {base * 1e3:.2f} ms, "
                  f"save {med['save'] * 1e3:.2f} ms ({med['save'] / base:.2f}), "
                  f"save+prune {med['save+prune'] * 1e3:.2f} ms ({med['save+prune'] / base:.2f})")


if __name__ == "__main__":
    main()
