"""Restore as a resuming process makes it: one split into N parts against one file and torch.load.

For each size (the suite's AdamW state) and folder, the state is written once: by ``torch.save``
and by ckptkit with ``roles.resume.write_threads`` N for each N asked. Then, each round, for each
case in turn (the order alternating), a new process holding the model and an optimizer that has
not stepped restores it once and reports how long that took:

* ``torch.load+load_state_dict``  the baseline of every ratio;
* ``ckptkit N=k``                 ``restore`` of the checkpoint saved in k parts (every part
                                  verified; the parts loaded several at a time).

    python benchmarks/bench_restore.py                               # 1 GiB, tmpfs, N = 1, 2, 4
    python benchmarks/bench_restore.py --sizes 100MB,1GiB --threads 1,8 --dir /tmp --rounds 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suite import build, load_average, parse_size, plain_state, size_label, timed_restore  # noqa: E402

import ckptkit  # noqa: E402
from ckptkit.plugins import make_plugin_manager  # noqa: E402

BASELINE = "torch.load+load_state_dict"


def manager(root: str, threads: int) -> ckptkit.CheckpointManager:
    return ckptkit.CheckpointManager.from_config(
        {"backends": {"disk": {"type": "local", "path": os.path.join(root, f"n{threads}")}},
         "roles": {"resume": {"backends": ["disk"], "every_n_steps": 1, "keep_last": 1,
                              "write_threads": threads}}},
        run_name="bench", plugin_manager=make_plugin_manager(autoload=False))


def child(case: str, size: int, root: str) -> float:
    """Seconds one restore of ``case`` took in this fresh process."""
    model, opt = build(size, fresh=True)
    ck = None if case == BASELINE else manager(root, int(case.split("=")[1]))
    return timed_restore(model, opt, os.path.join(root, "plain.pt"), ck)


def measure(size: int, folder: str, threads: list[int], rounds: int) -> dict[str, list[float]]:
    root = tempfile.mkdtemp(prefix="ckptkit-bench-restore-", dir=folder)
    try:
        model, opt = build(size)
        torch.save(plain_state(model, opt), os.path.join(root, "plain.pt"))
        for n in threads:
            with manager(root, n) as ck:
                ck.save(step=0, model=model, optimizer=opt)
        del model, opt
        cases = [BASELINE] + [f"ckptkit N={n}" for n in threads]
        times: dict[str, list[float]] = {c: [] for c in cases}
        for r in range(rounds):
            for case in cases if r % 2 == 0 else cases[::-1]:
                res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", case,
                                      "--sizes", str(size), "--dir", root], capture_output=True, text=True)
                if res.returncode:
                    raise RuntimeError(f"{case}: {res.stderr.strip().splitlines()[-1:]}")
                times[case].append(float(res.stdout.strip().splitlines()[-1]))
        return times
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1GiB")
    parser.add_argument("--threads", default="1,2,4", help="comma-separated write_threads values")
    parser.add_argument("--dir", action="append", help="a folder, repeatable (default /dev/shm)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    folders = args.dir or ["/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()]
    if args.child:
        print(child(args.child, sizes[0], folders[0]))
        return
    threads = [int(n) for n in args.threads.split(",")]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load_average()}")
    for size in sizes:
        for folder in folders:
            times = measure(size, folder, threads, args.rounds)
            base = statistics.median(times[BASELINE])
            for case, ts in times.items():
                med = statistics.median(ts)
                print(f"{size_label(size):>7}  {folder:10}  {case:28}  {med * 1e3:9.1f} ms  {med / base:5.2f}")
    print(f"load average after {load_average()}; ratio: the case's median / {BASELINE}'s, each a fresh process")


if __name__ == "__main__":
    main()
