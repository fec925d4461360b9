"""Full (``format: torch``) against sharded (``format: dcp``) checkpoints on 2 CPU ranks.

One invocation launches ``torchrun --nproc-per-node 2`` (gloo) once per mode. Each launch
builds the same FSDP2 model (``fully_shard`` on a CPU device mesh) of ``--size-mib`` MiB of
float32 parameters, takes one AdamW step so the optimizer holds exp_avg and exp_avg_sq (the
full state is about 3x the parameters), then ``--reps`` times: ``CheckpointManager.save`` to a
``local`` backend in ``--dir``, then ``CheckpointManager.restore`` into the same model and
optimizer after zeroing them (restored values are checked against a fingerprint).

Per phase (save, restore) and rank:

* time: wall clock from a barrier to the call's return; the table shows the median over the
  repetitions of the slowest rank;
* peak memory above baseline: the baseline is the resident set right before the call, after
  ``gc.collect()`` and ``malloc_trim(0)`` so memory freed by the previous phase is given back;
  the peak is the kernel's high-water mark (``VmHWM``), reset to the current RSS through
  ``/proc/self/clear_refs`` right before the call, so it is exact and not a lifetime maximum.
  A 10 ms sampler thread also records the anonymous part (``RssAnon``, heap) and the
  file-backed part (``RssFile``, e.g. a checkpoint mapped with ``torch.load(mmap=True)``).

    python benchmarks/bench_distributed.py                       # 256 MiB, temp folder in /var/tmp
    python benchmarks/bench_distributed.py --dir /dev/shm --size-mib 512 --reps 5

Run it on an idle machine: two ranks on two cores share everything.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

MODES = {"full": "torch", "sharded": "dcp"}
WIDTH = 2048  # one Linear(WIDTH, WIDTH) holds WIDTH * (WIDTH + 1) float32 values, about 16 MiB
MiB = 2**20


# -- memory probes (rank processes) --------------------------------------------------------

def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _checkpoint_mappings() -> list[str]:
    """Checkpoint files this process still has mapped (e.g. by ``torch.load(mmap=True)``)."""
    out = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and (parts[5].rstrip().endswith((".pt", ".distcp", ".pt (deleted)"))):
                out.add(parts[5].strip())
    return sorted(out)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Sampler:
    """Samples RSS every ``interval`` seconds in a thread; ``peaks()`` since the last ``reset``."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self._peak: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.samples = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            s = _status()
            with self._lock:
                self.samples += 1
                for k in ("VmRSS", "RssAnon", "RssFile"):
                    self._peak[k] = max(self._peak.get(k, 0), s[k])

    def reset(self) -> dict[str, int]:
        s = _status()
        with self._lock:
            self._peak = {k: s[k] for k in ("VmRSS", "RssAnon", "RssFile")}
            self.samples = 0
        return s

    def peaks(self) -> tuple[dict[str, int], int]:
        s = _status()
        with self._lock:
            for k in ("VmRSS", "RssAnon", "RssFile"):
                self._peak[k] = max(self._peak[k], s[k])
            return dict(self._peak), self.samples

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# -- the worker: one rank of one mode --------------------------------------------------------

def build(size_mib: int):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = max(1, round(size_mib * MiB / (WIDTH * (WIDTH + 1) * 4)))
    torch.manual_seed(0)  # the same full weights on every rank before sharding
    model = torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(1 + dist.get_rank())
    model(torch.randn(4, WIDTH)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _tensors(model, opt):
    """This rank's own tensors of model and optimizer, in a fixed order."""
    import torch

    out = [_local(p.data) for p in model.parameters()]
    for p in model.parameters():
        out += [_local(v) for _, v in sorted(opt.state[p].items()) if torch.is_tensor(v)]
    return out


def fingerprint(model, opt) -> list[float]:
    import torch

    with torch.no_grad():
        return [float(t.double().sum()) if t.numel() < 2**20 else float(t.sum(dtype=torch.float64))
                for t in _tensors(model, opt)]


def full_state_bytes(model, opt) -> int:
    """Bytes of the full (unsharded) model and optimizer state; DTensor.numel() is global."""
    import torch

    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for st in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return n


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import ckptkit
    from ckptkit.plugins import make_plugin_manager

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    fmt = MODES[args.worker]
    root = os.path.join(args.dir, args.worker)
    cfg = {"run_name": "bench",
           "backends": {"disk": {"type": "local", "path": root}},
           "roles": {"resume": {"backends": ["disk"], "every_n_steps": 1, "keep_last": 2, "format": fmt}}}
    ck = ckptkit.CheckpointManager.from_config(cfg, plugin_manager=make_plugin_manager(autoload=False))

    model, opt = build(args.size_mib)
    expected = fingerprint(model, opt)
    state_bytes = full_state_bytes(model, opt)
    _trim()
    build_status = _status()
    after_build = build_status["VmRSS"]
    sampler = Sampler(args.sample_s)
    hwm_ok = _reset_hwm()
    reps: list[dict] = []
    ckpt_bytes = 0

    def measure(fn):
        dist.barrier()
        _trim()
        base = sampler.reset()
        _reset_hwm()
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        peaks, samples = sampler.peaks()
        hwm = _status()["VmHWM"]
        return result, {
            "s": seconds,
            "base": base["VmRSS"],
            "peak": (hwm if hwm_ok else peaks["VmRSS"]) - base["VmRSS"],
            "sampled_peak": peaks["VmRSS"] - base["VmRSS"],
            "anon_peak": peaks["RssAnon"] - base["RssAnon"],
            "file_peak": peaks["RssFile"] - base["RssFile"],
            "samples": samples,
        }

    for i in range(args.reps):
        step = i + 1
        saved, save_m = measure(lambda step=step: ck.save(step=step, model=model, optimizer=opt, force=True))
        assert saved, f"rank {rank}: step {step} was not saved"
        if rank == 0 and saved[0].local_dir:
            ckpt_bytes = sum(os.path.getsize(os.path.join(d, f))
                             for d, _, files in os.walk(saved[0].local_dir) for f in files)
        with torch.no_grad():  # forget the state in place, so restore must really bring it back
            for t in _tensors(model, opt):
                t.zero_()
        restored, restore_m = measure(lambda: ck.restore(model=model, optimizer=opt))
        assert restored is not None and restored.step == step, f"rank {rank}: restored {restored}"
        got = fingerprint(model, opt)
        assert got == expected, f"rank {rank}: restore {step} brought back other values"
        reps.append({"save": save_m, "restore": restore_m})
    sampler.stop()
    _trim()
    now, built = _status(), build_status
    retained = {"rss": now["VmRSS"] - built["VmRSS"], "anon": now["RssAnon"] - built["RssAnon"],
                "file": now["RssFile"] - built["RssFile"], "mapped": _checkpoint_mappings()}
    ck.close()

    result = {"rank": rank, "world_size": world, "mode": args.worker, "format": fmt,
              "state_bytes": state_bytes, "ckpt_bytes": ckpt_bytes, "after_build_rss": after_build,
              "hwm_exact": hwm_ok, "retained": retained, "ckptkit": ckptkit.__file__, "torch": torch.__version__, "reps": reps}
    with open(os.path.join(args.dir, f"result-{args.worker}-{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


# -- the driver --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, folder: str, args) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={free_port()}", os.path.abspath(__file__), "--worker", mode,
           "--dir", folder, "--size-mib", str(args.size_mib), "--reps", str(args.reps),
           "--sample-s", str(args.sample_s)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        sys.exit(f"{mode}: torchrun failed ({proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    print(f"  {mode}: torchrun took {time.perf_counter() - start:.0f} s", file=sys.stderr)
    out = []
    for rank in range(2):
        with open(os.path.join(folder, f"result-{mode}-{rank}.json")) as f:
            out.append(json.load(f))
    return out


def summarise(results: list[dict]) -> dict:
    r0 = results[0]
    row = {"mode": r0["mode"], "format": r0["format"], "state": r0["state_bytes"], "ckpt": r0["ckpt_bytes"]}
    for phase in ("save", "restore"):
        slowest = [max(r["reps"][i][phase]["s"] for r in results) for i in range(len(r0["reps"]))]
        row[f"{phase}_s"] = statistics.median(slowest)
        row[f"{phase}_all_s"] = slowest
        for rank, r in enumerate(results):
            for key in ("peak", "sampled_peak", "anon_peak", "file_peak", "base"):
                row[f"{phase}_{key}_r{rank}"] = max(rep[phase][key] for rep in r["reps"])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/var/tmp", help="parent of the temporary checkpoint folder (on disk)")
    p.add_argument("--size-mib", type=int, default=256, help="MiB of float32 parameters (default 256)")
    p.add_argument("--reps", type=int, default=3, help="save+restore repetitions per mode (default 3)")
    p.add_argument("--modes", default="full,sharded", help="comma-separated: full, sharded")
    p.add_argument("--sample-s", type=float, default=0.01, help="RSS sampling interval (default 0.01)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds allowed per torchrun launch")
    p.add_argument("--json", help="also write the raw per-rank results here")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint folder")
    p.add_argument("--worker", choices=sorted(MODES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    folder = tempfile.mkdtemp(prefix="ckptkit-bench-dist-", dir=args.dir)
    print(f"2 ranks (gloo, CPU, FSDP2), {args.size_mib} MiB of parameters, {args.reps} reps, in {folder}",
          file=sys.stderr)
    raw, rows = {}, []
    try:
        for mode in args.modes.split(","):
            raw[mode] = launch(mode, folder, args)
            rows.append(summarise(raw[mode]))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": raw, "rows": rows}, f, indent=1)

    r0 = raw[next(iter(raw))][0]
    print(f"ckptkit {r0['ckptkit']}, torch {r0['torch']}; full state (model + AdamW) "
          f"{r0['state_bytes'] / MiB:.0f} MiB; peak = rank 0's high-water mark above its RSS right "
          f"before the call ({'VmHWM, exact' if r0['hwm_exact'] else 'sampled'}), worst of {args.reps} reps")
    head = (f"{'mode':<8} {'format':<6} {'save s':>7} {'restore s':>9} {'ckpt bytes':>13} "
            f"{'save peak MiB':>13} {'x state':>7} {'restore peak MiB':>16} {'x state':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['mode']:<8} {r['format']:<6} {r['save_s']:>7.2f} {r['restore_s']:>9.2f} {r['ckpt']:>13,} "
              f"{r['save_peak_r0'] / MiB:>13.0f} {r['save_peak_r0'] / r['state']:>7.2f} "
              f"{r['restore_peak_r0'] / MiB:>16.0f} {r['restore_peak_r0'] / r['state']:>7.2f}")
    print()
    print("details (MiB above baseline, worst rep; anon = heap, file = mapped files; times = slowest rank per rep):")
    for r in rows:
        for phase in ("save", "restore"):
            ranks_txt = "; ".join(
                f"rank {k}: peak {r[f'{phase}_peak_r{k}'] / MiB:.0f} (sampled {r[f'{phase}_sampled_peak_r{k}'] / MiB:.0f}, "
                f"anon {r[f'{phase}_anon_peak_r{k}'] / MiB:.0f}, file {r[f'{phase}_file_peak_r{k}'] / MiB:.0f}, "
                f"baseline {r[f'{phase}_base_r{k}'] / MiB:.0f})" for k in range(2))
            times = ", ".join(f"{s:.2f}" for s in r[f"{phase}_all_s"])
            print(f"  {r['mode']:<8} {phase:<7} [{times}] s; {ranks_txt}")
    print()
    print("held after the last restore, against right after building (MiB; what training continues with):")
    for mode, results in raw.items():
        for res in results:
            k = res["retained"]
            print(f"  {mode:<8} rank {res['rank']}: RSS {k['rss'] / MiB:+.0f} (anon {k['anon'] / MiB:+.0f}, "
                  f"file {k['file'] / MiB:+.0f}); checkpoint files still mapped: {k['mapped'] or 'none'}")


if __name__ == "__main__":
    main()
