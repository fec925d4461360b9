"""The checks that need a GPU, in one go: FSDP1 in both modes, exact resume on NCCL with CUDA
tensors, and asynchronous staging into pinned memory.

Run on a machine with at least one CUDA device:

    python benchmarks/gpu_checks.py [--nproc N]

The "cycle" checks launch tests/distributed/worker.py under torchrun with NCCL, save every step,
restore into a fresh model on the GPU, compare every rank's own shards bit for bit, and
finalize. The "resume" check runs tests/distributed/trainer.py (the CPU suite's ported trainer,
test_trainer_resume.py) on CUDA: per-rank data and RNG state in ``rank_extra`` (CUDA generators
included), DDP and FSDP2, both formats, stateless and stateful optimizers, an asynchronous save;
killed by SIGKILL after step 7 and resumed, it must match an uninterrupted run bit for bit. The
"pinned" check stages CUDA tensors as an asynchronous save does and checks that the buffers are
pinned and hold the same bytes. One line per check; exit 1 if any fails. ``--cpu`` runs the
resume check on gloo without a GPU, to check the script itself. The CPU suite skips the
FSDP1 test ("FSDP needs a non-CPU accelerator device"); this script is its GPU side.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "distributed", "worker.py")
TRAINER = os.path.join(ROOT, "tests", "distributed", "trainer.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc: int, wrap: str, fmt: str) -> tuple[bool, str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"run_name": "gpu", "backends": {"d": {"type": "local", "path": f"{tmp}/ck"},
                                               "f": {"type": "local", "path": f"{tmp}/final"}},
               "roles": {"resume": {"backends": ["d"], "every_n_steps": 1, "keep_last": 2, "format": fmt},
                         "final": {"backends": ["f"]}}}
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", WORKER, "cycle", tmp,
               json.dumps({"config": cfg, "wrap": wrap, "cuda": True})]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        took = time.perf_counter() - start
        if proc.returncode != 0:
            return False, proc.stderr[-2000:], took
        results = [json.load(open(os.path.join(tmp, f"result-cycle-{r}.json"))) for r in range(nproc)]
        bad = [r for r in results if r["diffs"] or r["restored_step"] != 3]
        final = torch.load(os.path.join(tmp, "final/gpu/final/final_model.pt"), weights_only=True)
        on_cpu = all(t.device.type == "cpu" for t in final["model"].values())
        ok = not bad and on_cpu
        return ok, f"restored step 3 on {nproc} rank(s), shards identical, final on CPU: {on_cpu}", took


def launch_trainer(nproc: int, scenario: str, workdir: str, opts: dict, cuda: bool = True) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", TRAINER, scenario, workdir, json.dumps({**opts, "cuda": cuda})]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300).returncode


def resume_exactly(nproc: int, cuda: bool = True) -> tuple[bool, str, float]:
    sys.path.insert(0, os.path.dirname(TRAINER))
    import trainer

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as base:
        plain, cut = os.path.join(base, "plain"), os.path.join(base, "cut")
        os.makedirs(plain)
        os.makedirs(cut)
        if launch_trainer(nproc, "uninterrupted", plain, {}, cuda) != 0:
            return False, "the uninterrupted run failed", time.perf_counter() - start
        for case in trainer.CASES:
            if launch_trainer(nproc, "killed", cut, {"cases": [case], "die_after": 6}, cuda) == 0:
                return False, f"{trainer.name_of(case)}: the run to be killed was not", time.perf_counter() - start
        if launch_trainer(nproc, "resumed", cut, {}, cuda) != 0:
            return False, "the resumed run failed", time.perf_counter() - start
        load = lambda d, s, r: json.load(open(os.path.join(d, f"result-{s}-{r}.json")))  # noqa: E731
        bad = []
        for case in trainer.CASES:
            name = trainer.name_of(case)
            for r in range(nproc):
                want, got = load(plain, "uninterrupted", r)[name], load(cut, "resumed", r)[name]
                tail = {k: v for k, v in want["losses"].items() if int(k) > got["start"]}
                if got["start"] not in ((3, 6) if case[3] else (6,)) or got["losses"] != tail:
                    bad.append(f"{name} rank {r}")
            a = torch.load(os.path.join(plain, f"final-{name}.pt"), weights_only=True)
            b = torch.load(os.path.join(cut, f"final-{name}.pt"), weights_only=True)
            if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
                bad.append(f"{name} final weights")
    detail = f"{len(trainer.CASES)} cases on {nproc} rank(s): " + ("; ".join(bad) if bad else "bit-identical")
    return not bad, detail, time.perf_counter() - start


def pinned_staging() -> tuple[bool, str, float]:
    """The first save snapshots on the device and the writer moves it into pinned buffers;
    later saves copy into those buffers, queued behind an event; both hold the same bytes."""
    from ckptkit.staging import Stager

    start = time.perf_counter()
    state = {"w": torch.randn(4096, 4096, device="cuda"), "opt": {"m": torch.randn(1024, device="cuda")}}
    want = state["w"].cpu()
    stager = Stager()
    first = stager.stage(state)
    snapshot = first["w"].is_cuda
    state["w"].add_(1)  # training goes on: the snapshot must not follow it
    first = stager.wait(first)
    ok = snapshot and first["w"].is_pinned() and first["opt"]["m"].is_pinned() and torch.equal(first["w"], want)
    second = stager.stage(state)
    reused = second["w"].data_ptr() == first["w"].data_ptr()
    second = stager.wait(second)
    ok = ok and reused and torch.equal(second["w"], state["w"].cpu()) and torch.equal(second["opt"]["m"], state["opt"]["m"].cpu())
    return ok, f"first save snapshot on device: {snapshot}; pinned, reused and equal: {ok}", time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=min(2, torch.cuda.device_count()))
    parser.add_argument("--cpu", action="store_true",
                        help="check this script itself without a GPU: the resume check on gloo, CPU tensors")
    parser.add_argument("--checks", default="cycle,resume,pinned",
                        help="which checks to run, comma-separated (default: cycle,resume,pinned)")
    args = parser.parse_args()
    checks = set(args.checks.split(","))
    if args.cpu:
        ok, detail, took = resume_exactly(2, cuda=False)
        print(f"{'PASS' if ok else 'FAIL'}  resume (cpu, gloo)  {took:6.1f}s  {detail}")
        return 0 if ok else 1
    if not torch.cuda.is_available():
        print("no CUDA device: these checks need a GPU", file=sys.stderr)
        return 1
    failed = 0
    cycles = (("fsdp1", "torch"), ("fsdp1", "dcp"), ("fsdp2", "torch"), ("fsdp2", "dcp"), ("ddp", "torch"))
    for wrap, fmt in cycles if "cycle" in checks else ():
        ok, detail, took = run(args.nproc, wrap, fmt)
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {wrap:6} format={fmt:5} {took:6.1f}s  {detail}")
    for label, check in (("resume", lambda: resume_exactly(args.nproc)), ("pinned", pinned_staging)):
        if label not in checks:
            continue
        ok, detail, took = check()
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {label:19} {took:6.1f}s  {detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
