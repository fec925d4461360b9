"""Parallel writes: one state split over N files written at once, against torch.save and DCP.

For each size (an AdamW training state, as in ``suite.py``) and each folder, in this one
process, alternating the order of the cases every round after one untimed warm-up each:

* ``torch.save+fsync``      one file, fsynced (the baseline of every ratio);
* ``ckptkit N=k``           a sync save to a ``local`` backend with ``roles.resume.write_threads: k``;
* ``DCP save threads=k``    ``torch.distributed.checkpoint.save`` (one process) through
                            ``FileSystemWriter(path, thread_count=k)``, its own fsyncs included.

With moto installed (and without ``--no-s3``) the same ckptkit cases save to an ``s3`` backend
on a moto server started on a free loopback port, against ``s3fs.put`` of the torch.save file
and DCP's ``FsspecWriter(thread_count=k)`` to the same server.

Every case writes into an empty folder (the previous round's checkpoint is removed, untimed),
so that no case pays for another's prune. Medians, ratios to torch.save+fsync, to DCP with the
same thread count, and to ckptkit with one file.

    PYTHONPATH=src python benchmarks/bench_parallel.py --no-s3
    python benchmarks/bench_parallel.py --sizes 100MB --threads 1,4 --folders /dev/shm --rounds 5
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import warnings
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suite import (  # noqa: E402  (the benchmarks folder is no package)
    Case,
    build,
    default_rounds,
    fsync_path,
    git_commit,
    load_average,
    parse_size,
    plain_state,
    race,
    size_label,
    state_bytes,
)

import ckptkit  # noqa: E402
from ckptkit.plugins import make_plugin_manager  # noqa: E402

BUCKET = "bench-parallel"


def manager(backend: dict[str, Any], threads: int, pm) -> ckptkit.CheckpointManager:
    return ckptkit.CheckpointManager.from_config(
        {"backends": {"store": backend},
         "roles": {"resume": {"backends": ["store"], "every_n_steps": 1, "keep_last": 1, "write_threads": threads}}},
        run_name=f"n{threads}", plugin_manager=pm())


def dcp_save(state: dict[str, Any], writer) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, storage_writer=writer)


def ckptkit_cases(backend: dict[str, Any], threads: list[int], model, opt, pm, remove) -> list[Case]:
    cases = []
    for n in threads:
        ck = manager(backend, n, pm)
        step = iter(range(10**9))
        case = Case(f"ckptkit N={n}", lambda ck=ck, step=step: ck.save(step=next(step), model=model, optimizer=opt),
                    lambda n=n: remove(f"n{n}"))
        case.manager = ck
        cases.append(case)
    return cases


def local_cases(folder: str, threads: list[int], model, opt) -> tuple[list[Case], str]:
    from torch.distributed.checkpoint import FileSystemWriter

    work = tempfile.mkdtemp(prefix="ckptkit-bench-parallel-", dir=folder)
    plain = os.path.join(work, "plain.pt")

    def torch_save():
        torch.save(plain_state(model, opt), plain)
        fsync_path(plain)

    cases = [Case("torch.save+fsync", torch_save, lambda: os.remove(plain))]
    ck_root = os.path.join(work, "ck")
    cases += ckptkit_cases({"type": "local", "path": ck_root}, threads, model, opt,
                           lambda: make_plugin_manager(autoload=False),
                           lambda run: shutil.rmtree(os.path.join(ck_root, run), ignore_errors=True))
    for n in threads:
        path = os.path.join(work, f"dcp-{n}")
        cases.append(Case(f"DCP save threads={n}",
                          lambda path=path, n=n: dcp_save(plain_state(model, opt), FileSystemWriter(path, thread_count=n)),
                          lambda path=path: shutil.rmtree(path, ignore_errors=True)))
    return cases, work


def s3_cases(endpoint: str, threads: list[int], model, opt, scratch: str) -> list[Case]:
    import s3fs
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    plain = os.path.join(scratch, "plain.pt")
    torch.save(plain_state(model, opt), plain)

    def rm(path: str) -> None:
        fs.invalidate_cache()
        if fs.exists(path):
            fs.rm(path, recursive=True)

    cases = [Case("s3fs.put of the torch.save file", lambda: fs.put(plain, f"{BUCKET}/put.pt"),
                  lambda: rm(f"{BUCKET}/put.pt"))]
    def pm():
        made = make_plugin_manager(autoload=False)
        made.load_backend_entrypoints(only_dist="ckptkit-s3")
        return made

    cases += ckptkit_cases({"type": "s3", "path": f"s3://{BUCKET}/ck", "storage_options": {"endpoint_url": endpoint}},
                           threads, model, opt, pm, lambda run: rm(f"{BUCKET}/ck/{run}"))
    for n in threads:
        path = f"s3://{BUCKET}/dcp-{n}"
        cases.append(Case(f"DCP save threads={n}",
                          lambda path=path, n=n: dcp_save(plain_state(model, opt), FsspecWriter(
                              path, thread_count=n, sync_files=False, endpoint_url=endpoint, skip_instance_cache=True)),
                          lambda path=path: rm(path)))
    return cases


def rows_of(size: int, real: int, where: str, cases: list[Case], threads: list[int]) -> list[dict[str, Any]]:
    med = {c.name: statistics.median(c.times) for c in cases}
    base = cases[0].name
    one = med.get(f"ckptkit N={threads[0]}")
    out = []
    for c in cases:
        n = int(c.name.rsplit("=", 1)[1]) if "=" in c.name else None
        dcp_same = med.get(f"DCP save threads={n}") if c.name.startswith("ckptkit") else None
        out.append({"size": size_label(size), "state_bytes": real, "where": where, "case": c.name, "median_s": med[c.name], "times": c.times,
                    "vs_baseline": med[c.name] / med[base],
                    "vs_dcp_same_threads": med[c.name] / dcp_same if dcp_same else None,
                    "speedup_vs_ckptkit_1": one / med[c.name] if c.name.startswith("ckptkit") and one else None})
    return out


def print_rows(rows: list[dict[str, Any]], baseline: str) -> None:
    print(f"| size | where | case | median | / {baseline} | / DCP same threads | speedup vs ckptkit N=1 |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        t = r["median_s"]
        text = f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"
        dcp = f"{r['vs_dcp_same_threads']:.2f}" if r["vs_dcp_same_threads"] else ""
        sp = f"{r['speedup_vs_ckptkit_1']:.2f}x" if r["speedup_vs_ckptkit_1"] else ""
        print(f"| {r['size']} | {r['where']} | {r['case']} | {text} | {r['vs_baseline']:.2f} | "
              f"{dcp} | {sp} |", flush=True)


def race_then_clean(cases: list, rounds: int, scratch: str) -> None:
    """``race`` the cases, then close their managers and remove their folder, whatever happened."""
    try:
        race(cases, rounds)
    finally:
        for c in cases:
            if hasattr(c, "manager"):
                c.manager.close()
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100MB,1GiB")
    ap.add_argument("--threads", default="1,2,4,8", help="write_threads and DCP thread_count values")
    ap.add_argument("--folders", default="/dev/shm,/tmp", help="local folders (tmpfs, disk)")
    ap.add_argument("--rounds", type=int, default=None, help="default: by size, as suite.py")
    ap.add_argument("--no-s3", action="store_true", help="leave out the S3 (moto) cases")
    ap.add_argument("--s3-sizes", default="100MB", help="sizes for the S3 cases (moto holds objects in memory)")
    ap.add_argument("--json", help="write every round's time here")
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    folders = [f for f in args.folders.split(",") if f and os.path.isdir(f)]
    with_s3 = not args.no_s3 and all(importlib.util.find_spec(m) for m in ("moto", "s3fs"))
    if not args.no_s3 and not with_s3:
        print("moto or s3fs is not installed: the S3 cases are left out (--no-s3 to say so)")
    start_load = load_average()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {start_load}, commit {git_commit()}")
    rows: list[dict[str, Any]] = []
    for size in sizes:
        model, opt = build(size)
        real = state_bytes(model, opt)
        rounds = args.rounds or default_rounds(real, remote=False)
        for folder in folders:
            where = "tmpfs" if folder.startswith("/dev/shm") else f"disk ({folder})"
            cases, work = local_cases(folder, threads, model, opt)
            race_then_clean(cases, rounds, work)
            got = rows_of(size, real, where, cases, threads)
            print_rows(got, cases[0].name)
            rows += got
        del model, opt
    if with_s3:
        from moto_server import moto_server

        for var, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                           ("AWS_DEFAULT_REGION", "us-east-1")):
            os.environ.setdefault(var, value)

        for size in [parse_size(s) for s in args.s3_sizes.split(",") if s]:
            model, opt = build(size)
            real = state_bytes(model, opt)
            rounds = args.rounds or default_rounds(real, remote=True)
            scratch = tempfile.mkdtemp(prefix="ckptkit-bench-parallel-")
            with moto_server() as endpoint:  # a fresh server per size: moto keeps what it was sent
                cases = s3_cases(endpoint, threads, model, opt, scratch)
                race_then_clean(cases, rounds, scratch)
            got = rows_of(size, real, "s3 (moto)", cases, threads)
            print_rows(got, cases[0].name)
            rows += got
            del model, opt
    end_load = load_average()
    print(f"load average at the end {end_load}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "cpus": os.cpu_count(), "commit": git_commit(),
                       "load_average": [start_load, end_load], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
