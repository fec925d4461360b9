"""What copying into new memory costs against copying into memory already touched.

The first asynchronous save copies the state into staging buffers that are new memory; later
saves reuse them. This prints both for one tensor, alternating, with one thread (the writer
thread's copy competes with training for the others):

    python benchmarks/bench_new_memory.py [--size-gib 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    src = torch.randn(int(args.size_gib * 2**30) // 4)
    new, reused = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        buf = torch.empty_like(src)
        buf.copy_(src)
        new.append(time.perf_counter() - start)
        start = time.perf_counter()
        buf.copy_(src)
        reused.append(time.perf_counter() - start)
        del buf
    print(f"{args.size_gib:g} GiB, one thread, medians of {args.rounds}: "
          f"into new memory {statistics.median(new):.3f} s, into the same memory again "
          f"{statistics.median(reused):.3f} s ({statistics.median(new) / statistics.median(reused):.1f}x)")


if __name__ == "__main__":
    main()
