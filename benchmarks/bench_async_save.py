"""How long a save holds up the training thread: synchronous against ``async: true``.

Same process, same 1 GiB model, same local folder, alternating. For the async case it prints
the time ``save`` blocks (staging into CPU buffers; the first save allocates them, later ones
reuse them) and, separately, how long the background write then took.

    python benchmarks/bench_async_save.py [--size-gib 1] [--dir /var/tmp] [--rounds 3] [--device cuda]

With ``--device cuda`` the model lives on the GPU, so the async save stages into pinned host
buffers and the sync save copies to the host as it writes.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

from torch import nn

import ckptkit
from ckptkit.plugins import make_plugin_manager


def build_model(size_gib: float) -> nn.Module:
    layers = max(1, int(size_gib * 2**30 / (2048 * 2048 * 4)))
    return nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(layers)])


def manager(folder: str, is_async: bool) -> ckptkit.CheckpointManager:
    return ckptkit.CheckpointManager.from_config(
        {"backends": {"d": {"type": "local", "path": folder}},
         "roles": {"resume": {"backends": ["d"], "every_n_steps": 1, "keep_last": 2, "async": is_async,
                                    # what save itself holds: no optimizer step follows it here
                                    **({"async_copy": "blocking"} if is_async else {})}}},
        run_name="bench", plugin_manager=make_plugin_manager(autoload=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="where the model lives: cpu or cuda")
    args = parser.parse_args()
    model = build_model(args.size_gib).to(args.device)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    folder = tempfile.mkdtemp(prefix="ckptkit-async-", dir=args.dir)
    sync_ck, async_ck = manager(f"{folder}/sync", False), manager(f"{folder}/async", True)
    blocked: dict[str, list[float]] = {"sync": [], "async (first save)": [], "async": []}
    background: list[float] = []
    for r in range(args.rounds + 1):
        start = time.perf_counter()
        sync_ck.save(step=r, model=model)
        blocked["sync"].append(time.perf_counter() - start)
        start = time.perf_counter()
        async_ck.save(step=r, model=model)
        blocked["async (first save)" if r == 0 else "async"].append(time.perf_counter() - start)
        start = time.perf_counter()
        async_ck.wait()
        background.append(time.perf_counter() - start)
    sync_ck.close()
    async_ck.close()
    shutil.rmtree(folder)
    print(f"{size / 2**30:.2f} GiB state, {args.rounds} rounds after one warm-up, into {args.dir or tempfile.gettempdir()}")
    print(f"{'case':22} {'training thread blocked, s (median)':>36}")
    blocked["sync"] = blocked["sync"][1:]
    for case, times in blocked.items():
        print(f"{case:22} {statistics.median(times):36.3f}")
    print(f"{'async write after save':22} {statistics.median(background[1:]):36.3f}  (in the background)")


if __name__ == "__main__":
    main()
