"""The checks that need a GPU, in one go: FSDP1 in both modes, and CUDA tensors staged to the CPU.

Run on a machine with at least one CUDA device:

    python benchmarks/gpu_checks.py [--nproc N]

Each check launches tests/distributed/worker.py under torchrun with NCCL, saves every step,
restores into a fresh model on the GPU, compares every rank's own shards bit for bit, and
finalizes. It prints one line per check and exits 1 if any fails. The CPU test suite skips the
FSDP1 test with the reason "FSDP needs a non-CPU accelerator device"; this script is its GPU side.
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=min(2, torch.cuda.device_count()))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: these checks need a GPU", file=sys.stderr)
        return 1
    failed = 0
    for wrap, fmt in (("fsdp1", "torch"), ("fsdp1", "dcp"), ("fsdp2", "torch"), ("fsdp2", "dcp"), ("ddp", "torch")):
        ok, detail, took = run(args.nproc, wrap, fmt)
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {wrap:6} format={fmt:5} {took:6.1f}s  {detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
