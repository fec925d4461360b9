"""Per-rank state under torchrun: each rank saves its own loader position and generator, then
each rank of another job (1, 2 or 3 ranks) restores; every rank writes what it got as JSON."""

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist

import ckptkit


class Sampler:
    def __init__(self, pos=-1):
        self.pos = pos

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def main() -> None:
    scenario, workdir, fmt = sys.argv[1:4]
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    cfg = {"run_name": "ranks",
           "backends": {"local": {"type": "local", "path": os.path.join(workdir, "ckpts")}},
           "roles": {"resume": {"backends": ["local"], "every_n_steps": 1, "keep_last": 2, "format": fmt}}}
    ck = ckptkit.CheckpointManager.from_config(cfg)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    if dist.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    result = {}
    if scenario == "save":
        gen = torch.Generator().manual_seed(1000 + rank)
        for step in range(2):
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
            torch.randint(0, 10, (5,), generator=gen)
            ck.save(step=step, model=model, optimizer=opt, extra={"shared": "rank 0 only"},
                    rank_extra={"loader": Sampler(100 * rank + step), "gen": gen.get_state()})
        result["next_draw"] = torch.randint(0, 10**6, (3,), generator=gen).tolist()
    else:
        loader = Sampler()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            restored = ck.restore(model, opt, rank_extra={"loader": loader})
        gen = torch.Generator()
        if "gen" in restored.rank_extra:
            gen.set_state(restored.rank_extra["gen"])
            result["next_draw"] = torch.randint(0, 10**6, (3,), generator=gen).tolist()
        result.update(step=restored.step, pos=loader.pos, extra=restored.extra,
                      missing=list(restored.ranks_without_state),
                      warnings=[str(w.message) for w in caught if "rank_extra" in str(w.message)])
    ck.close()
    with open(os.path.join(workdir, f"result-{scenario}-{rank}.json"), "w") as f:
        json.dump(result, f)
    if dist.is_initialized():
        # Leave together: a rank that tears gloo down while another still talks to it aborts.
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
