"""Run by torchrun from test_distributed.py: one scenario per launch, results as JSON per rank.

Usage: torchrun --nproc-per-node N worker.py SCENARIO WORKDIR [OPTIONS_JSON]
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

import ckptkit
from ckptkit import ranks


def model_factory(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                               torch.nn.ReLU(), torch.nn.Linear(64, 8))


DEVICE = torch.device("cpu")


def wrap(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    model = model.to(DEVICE)
    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(model, use_orig_params=True)
    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(DEVICE.type, (dist.get_world_size(),))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    return model


def build(kind: str, seed: int):
    model = wrap(model_factory(seed), kind)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model, opt, steps: int, ck=None, start: int = 0) -> None:
    for step in range(start, start + steps):
        torch.manual_seed(1000 + step + ranks.rank())
        loss = model(torch.randn(4, 16).to(DEVICE)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ck is not None:
            ck.save(step=step, epoch=0, model=model, optimizer=opt, metrics={"loss": loss.item()},
                    extra={"rank0_note": f"saved at {step}"})


def local(value):
    return value.to_local() if hasattr(value, "to_local") else value


def snapshot(model, opt) -> dict:
    """This rank's own view of model and optimizer (local shards for FSDP), cloned."""
    snap = {"model": {k: local(v).detach().cpu().clone() for k, v in model.state_dict().items()}}
    snap["optim"] = {f"{pid}.{k}": local(v).cpu().clone() for pid, st in opt.state_dict()["state"].items()
                     for k, v in st.items() if torch.is_tensor(v)}
    return snap


def same(a: dict, b: dict) -> list[str]:
    diffs = []
    for part in a:
        for k in a[part]:
            if k not in b[part] or not torch.equal(a[part][k], b[part][k]):
                diffs.append(f"{part}:{k}")
    return diffs


def full_model_state(model) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def main() -> None:
    scenario, workdir = sys.argv[1], sys.argv[2]
    opts = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    global DEVICE
    if opts.get("cuda"):
        DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(DEVICE)
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if opts.get("cuda") else "gloo")
    rank = ranks.rank()
    result: dict = {"rank": rank, "world_size": ranks.world_size()}
    cfg = opts["config"]
    kind = opts.get("wrap", "plain")

    if scenario == "cycle":
        # Save every step, keep the last 2, restore into a fresh model, compare, finalize.
        ck = ckptkit.CheckpointManager.from_config(cfg)
        model, opt = build(kind, seed=0)
        train(model, opt, steps=4, ck=ck)
        expected = snapshot(model, opt)
        full = full_model_state(model)
        ck.wait()  # an asynchronous save may still be writing
        result["kept"] = [r.step for r in ck.list_checkpoints()] if rank == 0 else None
        model2, opt2 = build(kind, seed=7)
        restored = ck.restore(model=model2, optimizer=opt2)
        result["restored_step"] = restored.step
        result["extra"] = restored.extra
        result["diffs"] = same(expected, snapshot(model2, opt2))
        refs = ck.finalize(model=model2, step=restored.step, metrics={"loss": 0.5})
        result["final"] = [r.uri for r in refs]
        if rank == 0:
            torch.save(full, os.path.join(workdir, "expected_full.pt"))
        ck.close()

    elif scenario == "save":
        ck = ckptkit.CheckpointManager.from_config(cfg)
        model, opt = build(kind, seed=0)
        train(model, opt, steps=2, ck=ck)
        full = full_model_state(model)
        if rank == 0:
            torch.save(full, os.path.join(workdir, "expected_full.pt"))
        ck.close()

    elif scenario == "restore":
        ck = ckptkit.CheckpointManager.from_config(cfg)
        model, opt = build(kind, seed=9)
        restored = ck.restore(model=model, optimizer=opt)
        result["restored_step"] = restored.step
        full = full_model_state(model)
        if rank == 0:
            expected = torch.load(os.path.join(workdir, "expected_full.pt"), weights_only=True)
            result["diffs"] = [k for k in expected if not torch.equal(expected[k], full[k])]
            result["keys"] = len(expected)
        train(model, opt, steps=1)  # the optimizer state is usable after resharding
        ck.close()

    elif scenario == "rank0_fails":
        ck = ckptkit.CheckpointManager.from_config(cfg)
        model, opt = build(kind, seed=0)
        train(model, opt, steps=1)
        try:
            # Only rank 0 serialises in full mode; an unpicklable value fails its save half-way.
            ck.save(step=1, model=model, optimizer=opt, force=True,
                    extra={"bad": (lambda: None) if rank == 0 else 0})
            result["raised"] = None
        except ckptkit.SaveError as exc:
            result["raised"] = str(exc)
        result["listed"] = [r.step for r in ck.list_checkpoints()]
        ck.close()

    with open(os.path.join(workdir, f"result-{scenario}-{rank}.json"), "w") as f:
        json.dump(result, f, default=str)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
