"""Restore a model and AdamW state from S3 two ways against one moto server, each in its own process.

  ckptkit  CheckpointManager.restore from an s3 backend (download verified into a scratch file,
           then loaded from it)
  get      s3fs.get of the torch.save file to a local file, torch.load, load_state_dict

Each case restores into a fresh model and an optimizer that has not stepped, as a resuming
process holds them, and prints the private (anonymous) memory it added at its peak, sampled
every 2 ms, and the peak resident memory it added (which also counts the pages of a mapped
file: page cache, given back under pressure), both as multiples of the state's size S.

Run: python benchmarks/bench_s3_restore_memory.py [--mib 256] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moto_server import moto_server  # noqa: E402
from suite import _status as status  # noqa: E402  (a field of /proc/self/status, in bytes)

BUCKET = "bench"


class Peak:
    """The most ``RssAnon`` and ``VmRSS`` seen while the block runs, sampled on a thread."""

    def __enter__(self) -> Peak:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the kernel's VmHWM starts afresh
        self.anon0, self.rss0 = status("RssAnon:"), status("VmRSS:")
        self.anon, self.done = self.anon0, threading.Event()

        def sample() -> None:
            while not self.done.wait(0.002):
                self.anon = max(self.anon, status("RssAnon:"))

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.anon = max(self.anon, status("RssAnon:")) - self.anon0
        self.rss = status("VmHWM:") - self.rss0


def case(name: str, endpoint: str, mib: int) -> dict:
    import s3fs
    import torch

    from suite import build, plain_state, state_bytes

    key = f"{BUCKET}/{mib}"
    if name == "save":  # the state both cases restore, saved by each way once
        trained, trained_opt = build(mib * 2**20)
        ck = manager(endpoint, key)
        ck.save(step=1, model=trained, optimizer=trained_opt)
        ck.close()
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        with fs.open(f"{key}/plain.pt", "wb") as f:
            torch.save(plain_state(trained, trained_opt), f)
        return {"state_bytes": state_bytes(trained, trained_opt)}
    model, opt = build(mib * 2**20, fresh=True)
    with tempfile.TemporaryDirectory() as workdir:
        if name == "ckptkit":
            ck = manager(endpoint, key)
            with Peak() as peak:
                start = time.perf_counter()
                assert ck.restore(model=model, optimizer=opt).step == 1
                elapsed = time.perf_counter() - start
            ck.close()
        elif name == "get":
            fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
            local = os.path.join(workdir, "plain.pt")
            with Peak() as peak:
                start = time.perf_counter()
                fs.get(f"{key}/plain.pt", local)
                sd = torch.load(local, weights_only=True)
                model.load_state_dict(sd["model"])
                opt.load_state_dict(sd["optimizer"])
                del sd
                elapsed = time.perf_counter() - start
        else:
            raise ValueError(name)
    return {"case": name, "seconds": elapsed, "anon": peak.anon, "rss": peak.rss}


def manager(endpoint: str, key: str):
    import ckptkit
    from ckptkit.plugins import make_plugin_manager

    pm = make_plugin_manager(autoload=False)
    pm.load_backend_entrypoints(only_dist="ckptkit-s3")
    return ckptkit.CheckpointManager.from_config({
        "backends": {"s3": {"type": "s3", "path": f"s3://{key}/ck", "storage_options": {"endpoint_url": endpoint}}},
        "roles": {"resume": {"backends": ["s3"], "every_n_steps": 1, "keep_last": 1}},
    }, run_name="bench", plugin_manager=pm)


def run_case(name: str, endpoint: str, mib: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--case", name, "--endpoint", endpoint, "--mib", str(mib)],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"case {name} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--case")
    ap.add_argument("--endpoint")
    args = ap.parse_args()
    for var, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(var, value)
    if args.case:
        print(json.dumps(case(args.case, args.endpoint, args.mib)))
        return
    with moto_server() as endpoint:
        import s3fs

        s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir(BUCKET)
        size = run_case("save", endpoint, args.mib)["state_bytes"]
        results: dict[str, list[dict]] = {"get": [], "ckptkit": []}
        for i in range(args.repeat):
            for name in (("get", "ckptkit") if i % 2 == 0 else ("ckptkit", "get")):
                results[name].append(run_case(name, endpoint, args.mib))
    print(f"restore of a {size / 2**20:.0f} MiB state (S) from S3, moto server on loopback, "
          f"each case in a fresh process, worst of {args.repeat}")
    print(f"{'case':10} {'seconds':>8} {'private memory added':>21} {'resident added':>15}")
    for name in ("get", "ckptkit"):
        rows = results[name]
        print(f"{name:10} {max(r['seconds'] for r in rows):8.2f} {max(r['anon'] for r in rows) / size:19.2f} S "
              f"{max(r['rss'] for r in rows) / size:13.2f} S")


if __name__ == "__main__":
    main()
