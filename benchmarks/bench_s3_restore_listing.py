"""Requests and time for restore to find the newest of N committed checkpoints on S3.

Fills a moto server with N committed checkpoints of one run (a tiny state.pt and its
manifest each), then counts the S3 requests botocore sends and the time taken by:
  list     list_checkpoints (what restore, ls and prune start from)
  restore  CheckpointManager.restore end to end (list, read the newest manifest, fetch, load)
  walk     the folder-by-folder listing that fsspec's find(maxdepth=2) does on s3fs, for scale
Run: python benchmarks/bench_s3_restore_listing.py [--n 1000]
"""

from __future__ import annotations

import argparse
import io
import os
import time

from moto_server import moto_server


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import s3fs
    import torch

    import ckptkit
    from ckptkit.checkpoint import Payload, PayloadFile
    from ckptkit.hashing import hash_stream
    from ckptkit.manifest import MANIFEST_NAME, FileEntry
    from ckptkit.plugins import make_plugin_manager
    from ckptkit.storage import step_dirname

    with moto_server() as endpoint:
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        fs.mkdir("bench")
        model = torch.nn.Linear(4, 4)
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": None, "extra": {}}, buf)
        blob = buf.getvalue()
        size, digest = hash_stream(io.BytesIO(blob))
        objects = {}
        t0 = time.perf_counter()
        for step in range(args.n):
            payload = Payload(run_name="run", step=step, epoch=0, format="torch",
                              files=(PayloadFile("state.pt", write=lambda f: None),))
            folder = f"bench/ckpts/run/{step_dirname(step)}"
            objects[f"{folder}/state.pt"] = blob
            objects[f"{folder}/{MANIFEST_NAME}"] = payload.manifest({"state.pt": FileEntry(size, digest)}).to_json()
        fs.pipe(objects)
        print(f"wrote {args.n} committed checkpoints ({len(objects)} objects) in {time.perf_counter() - t0:.1f} s")

        pm = make_plugin_manager(autoload=False)
        pm.load_backend_entrypoints(only_dist="ckptkit-s3")
        ck = ckptkit.CheckpointManager.from_config({
            "backends": {"s3": {"type": "s3", "path": "s3://bench/ckpts", "storage_options": {"endpoint_url": endpoint}}},
            "roles": {"resume": {"backends": ["s3"], "every_n_steps": 1, "keep_last": 3}},
        }, run_name="run", plugin_manager=pm)
        backend = ck.router.instances["s3"]
        sent: list[str] = []
        backend.fs.call_s3("head_bucket", Bucket="bench")  # connect, so the client exists to hook
        backend.fs.s3.meta.events.register("before-send.s3", lambda request, **kw: sent.append(request.method))
        rows = []

        def measure(name, fn):
            sent.clear()
            t = time.perf_counter()
            out = fn()
            rows.append((name, len(sent), time.perf_counter() - t))
            return out

        refs = measure("list", ck.list_checkpoints)
        assert len(refs) == args.n and refs[0].step == args.n - 1
        restored = measure("restore", lambda: ck.restore(model=torch.nn.Linear(4, 4)))
        assert restored.step == args.n - 1

        def walk():
            backend.fs.invalidate_cache()
            return backend.fs.find(backend.run_path("run"), maxdepth=2, withdirs=False)

        measure("walk", walk)
        print(f"{args.n} committed checkpoints on S3 (moto on loopback)")
        print(f"{'operation':10} {'requests':>9} {'seconds':>8}")
        for name, count, secs in rows:
            print(f"{name:10} {count:9d} {secs:8.2f}")


if __name__ == "__main__":
    main()
