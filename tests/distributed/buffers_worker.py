"""Each rank's own buffers under torchrun: 2 ranks train a model with BatchNorm on batches of
their own and save; a job of 1, 2 or 3 ranks restores; every rank writes its running mean."""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import ckptkit


def build(wrap):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    if wrap == "fsdp2":
        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
    elif wrap == "ddp-own-buffers":
        model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    elif wrap == "ddp":  # broadcasts rank 0's buffers before each forward pass
        model = torch.nn.parallel.DistributedDataParallel(model)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def main() -> None:
    scenario, workdir, fmt, wrap = sys.argv[1:5]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = {"run_name": "buffers",
           "backends": {"local": {"type": "local", "path": os.path.join(workdir, "ckpts")}},
           "roles": {"resume": {"backends": ["local"], "every_n_steps": 1, "format": fmt}}}
    ck = ckptkit.CheckpointManager.from_config(cfg)
    model, opt = build(wrap)
    bn = (model.module if wrap.startswith("ddp") else model)[1]
    if scenario == "save":
        torch.manual_seed(100 + rank)  # each rank its own batch, as a DistributedSampler gives
        model(torch.randn(16, 4) + rank).sum().backward()
        opt.step()
        ck.save(step=1, model=model, optimizer=opt)
    else:
        ck.restore(model=model, optimizer=opt)
    ck.close()
    with open(os.path.join(workdir, f"result-{scenario}-{rank}.json"), "w") as f:
        json.dump({"running_mean": bn.running_mean.tolist(), "batches": int(bn.num_batches_tracked)}, f)
    dist.barrier()
    dist.destroy_process_group()
    # Leave without the interpreter's finalization: gloo's threads may free a finished
    # collective's tensors after it began, which aborts the rank (SIGABRT, 'terminate called
    # without an active exception'; pytorch/pytorch#190489). The results are written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
