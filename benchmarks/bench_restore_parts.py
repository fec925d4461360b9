"""Where a small restore's time goes, against torch.load+load_state_dict of the same state.

For each size, the suite's AdamW state is saved once by ckptkit (local backend) and once by
``torch.save``. Each round restores both into the same model and an optimizer (alternating
their order), with the stages of ckptkit's restore timed as they run: the listing, the
manifest (read, its own checksum, parsed), the state file's checksum (on this thread for a file
under 1 MiB, else beside the load), the weights-only load, and copying the state into the model
and optimizer. ``--fresh`` runs one restore per new process instead, as a resuming process
makes it (a process's first ``torch.load`` pays for imports the later ones do not). In one
process, one manager restores every round, as ``suite.py`` times it.

    python benchmarks/bench_restore_parts.py                      # 1 MB and 10 MB, tmpfs
    python benchmarks/bench_restore_parts.py --sizes 1MB --fresh --rounds 9 --dir /tmp

The stages are timed by wrapping ckptkit's own functions in this process: a tool for finding
fixed costs, not a measure of ckptkit's speed (``suite.py`` is that).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suite import build, local_manager, parse_size, plain_state, size_label  # noqa: E402

import ckptkit.gather as gather  # noqa: E402
import ckptkit.manager as manager  # noqa: E402
import ckptkit.reading as reading  # noqa: E402

STAGES = [
    (manager.CheckpointManager, "_listing", "listing"),
    (reading.Reader, "manifest", "manifest"),
    (reading.Reader, "_check", "checksum (this thread)"),
    (reading, "load", "weights-only load"),
    (gather, "load_resume_state", "into model and optimizer"),
]


def timed_stages() -> dict[str, float]:
    """Wrap each stage, once, so that its seconds add up in the returned dict as it runs."""
    spent: dict[str, float] = collections.defaultdict(float)
    for owner, name, label in STAGES:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*args, _fn=fn, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                spent[_label] += time.perf_counter() - start

        setattr(owner, name, timed)
    return spent


SPENT = timed_stages()


def restore_once(case: str, size: int, folder: str, model=None, opt=None, ck=None) -> dict[str, float]:
    """Seconds of one restore of ``case`` ("torch" or "ckptkit"), with ckptkit's stages; by
    ``ck`` when given (a manager that restored before, as suite.py times it), else a new one."""
    if model is None:
        model, opt = build(size, fresh=True)
    if case == "torch":
        start = time.perf_counter()
        sd = torch.load(os.path.join(folder, "plain.pt"), weights_only=True)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optimizer"])
        return {"total": time.perf_counter() - start}
    own = ck is None
    ck = local_manager(os.path.join(folder, "ck")) if own else ck
    SPENT.clear()
    start = time.perf_counter()
    ck.restore(model=model, optimizer=opt)
    total = time.perf_counter() - start
    if own:
        ck.close()
    return {"total": total, **SPENT}


def child() -> None:
    case, size, folder = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    print(json.dumps(restore_once(case, size, folder)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1MB,10MB")
    parser.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--fresh", action="store_true", help="one restore per new process")
    args = parser.parse_args()
    rounds = args.rounds if not args.fresh else min(args.rounds, 15)
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        folder = tempfile.mkdtemp(prefix="ckptkit-restore-parts-", dir=args.dir)
        try:
            model, opt = build(size)
            ck = local_manager(os.path.join(folder, "ck"))
            ck.save(step=1, model=model, optimizer=opt)
            ck.close()
            torch.save(plain_state(model, opt), os.path.join(folder, "plain.pt"))
            del model, opt
            runs: dict[str, list[dict[str, float]]] = {"torch": [], "ckptkit": []}
            target = None if args.fresh else (*build(size, fresh=True), local_manager(os.path.join(folder, "ck")))
            if target is not None:  # one untimed warm-up each
                for case in runs:
                    restore_once(case, size, folder, *target)
            for i in range(rounds):
                for case in (("torch", "ckptkit") if i % 2 == 0 else ("ckptkit", "torch")):
                    if args.fresh:
                        out = subprocess.run([sys.executable, __file__, "--child", case, str(size), folder],
                                             capture_output=True, text=True, check=True)
                        runs[case].append(json.loads(out.stdout.strip().splitlines()[-1]))
                    else:
                        runs[case].append(restore_once(case, size, folder, *target))
            if target is not None:
                target[2].close()
            base = statistics.median(r["total"] for r in runs["torch"])
            ours = statistics.median(r["total"] for r in runs["ckptkit"])
            where = "a new process each" if args.fresh else "one process"
            print(f"\n{size_label(size)} in {args.dir}, {where}, medians of {rounds} rounds")
            print(f"  {'torch.load+load_state_dict':32s} {base * 1e3:8.3f} ms")
            print(f"  {'ckptkit restore':32s} {ours * 1e3:8.3f} ms   ratio {ours / base:.2f}")
            for _, _, label in STAGES:
                part = statistics.median(r.get(label, 0.0) for r in runs["ckptkit"])
                print(f"    {label:30s} {part * 1e3:8.3f} ms")
        finally:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child()
    else:
        main()
