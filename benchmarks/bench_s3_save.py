"""Save a 512 MiB state to S3 three ways against one moto server, each case in its own process.

  ckptkit  CheckpointManager.save to an s3 backend (streaming multipart upload)
  put      s3fs.put of the same bytes already written to disk by torch.save
  bytesio  torch.save into io.BytesIO, then the buffer written to an s3fs file

Prints wall time and peak RSS (minus the RSS once the state is built) side by side.
Run: python benchmarks/bench_s3_save.py [--mib 512] [--repeat 1]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from moto_server import moto_server

BUCKET = "bench"


def reset_peak() -> None:
    """Start the kernel's high-water mark of this process's RSS afresh (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def state(mib: int):
    import torch

    n = mib * 2**20 // 4 // 4096
    return {"model": {"weight": torch.randn(n, 4096)}, "step": 1}


def case(name: str, endpoint: str, mib: int, workdir: str) -> dict:
    import s3fs
    import torch

    st = state(mib)
    base = current_rss()
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    key = f"{BUCKET}/{name}-{os.getpid()}"
    if name == "ckptkit":
        import ckptkit
        from ckptkit.plugins import make_plugin_manager

        pm = make_plugin_manager(autoload=False)
        pm.load_backend_entrypoints(only_dist="ckptkit-s3")
        ck = ckptkit.CheckpointManager.from_config({
            "backends": {"s3": {"type": "s3", "path": f"s3://{key}", "storage_options": {"endpoint_url": endpoint}}},
            "roles": {"resume": {"backends": ["s3"], "every_n_steps": 1, "keep_last": 1}},
        }, run_name="bench", plugin_manager=pm)
        model = torch.nn.Linear(4096, 4, bias=False)
        model.weight = torch.nn.Parameter(st["model"]["weight"], requires_grad=False)
        del st
        base = current_rss()
        reset_peak()
        t0 = time.perf_counter()
        ck.save(step=1, model=model)
        elapsed = time.perf_counter() - t0
    elif name == "put":
        path = os.path.join(workdir, "state.pt")
        torch.save(st, path)
        base = current_rss()
        reset_peak()
        t0 = time.perf_counter()
        fs.put(path, key)
        elapsed = time.perf_counter() - t0
    elif name == "bytesio":
        reset_peak()
        t0 = time.perf_counter()
        buf = io.BytesIO()
        torch.save(st, buf)
        with fs.open(key, "wb") as f:
            f.write(buf.getbuffer())
        elapsed = time.perf_counter() - t0
    else:
        raise ValueError(name)
    return {"case": name, "seconds": elapsed, "peak_over_state_mib": (peak_rss() - base) / 2**20,
            "peak_rss_mib": peak_rss() / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--case")
    ap.add_argument("--endpoint")
    args = ap.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    if args.case:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(case(args.case, args.endpoint, args.mib, d)))
        return

    with moto_server() as endpoint:
        import s3fs

        s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir(BUCKET)
        results: dict[str, list[dict]] = {}
        for _ in range(args.repeat):
            for name in ("put", "ckptkit", "bytesio"):
                out = subprocess.run([sys.executable, __file__, "--case", name, "--endpoint", endpoint,
                                      "--mib", str(args.mib)], capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"case {name} failed:\n{out.stderr}")
                results.setdefault(name, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
                requests_reset = subprocess.run(
                    ["curl", "-s", "-X", "POST", f"{endpoint}/moto-api/reset"], capture_output=True)
                del requests_reset
                s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir(BUCKET)
        put = min(r["seconds"] for r in results["put"])
        print(f"{args.mib} MiB state, moto server on loopback, best of {args.repeat}")
        print(f"{'case':10} {'seconds':>8} {'x put':>6} {'peak RSS over state (MiB)':>26} {'peak RSS (MiB)':>15}")
        for name in ("put", "ckptkit", "bytesio"):
            best = min(results[name], key=lambda r: r["seconds"])
            print(f"{name:10} {best['seconds']:8.2f} {best['seconds'] / put:6.2f} "
                  f"{max(r['peak_over_state_mib'] for r in results[name]):26.0f} "
                  f"{max(r['peak_rss_mib'] for r in results[name]):15.0f}")


if __name__ == "__main__":
    main()
