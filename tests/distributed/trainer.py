"""A trainer ported to ckptkit the obvious way, run by torchrun from test_trainer_resume.py.

Each rank samples its own batches with its own generator, and dropout draws from each rank's
own torch RNG, so a rank that resumed with another rank's state trains differently. The
sampler and ``ckptkit.RngState`` go in ``rank_extra``; the LR scheduler (the same on every
rank) in ``extra``.

Usage: torchrun --nproc-per-node N trainer.py SCENARIO WORKDIR [OPTIONS_JSON]
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
import weakref

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import ckptkit
from ckptkit import ranks

STEPS = 10
EVERY = 3
# wrapping, format, optimizer, async (True: the default async_copy, optimizer_state; or "background"):
# stateless SGD and each stateful optimizer, under DDP and FSDP2, in both formats.
CASES = [
    ("ddp", "torch", "sgd", False),
    ("ddp", "dcp", "adagrad", False),
    ("ddp", "torch", "adam", True),
    ("ddp", "torch", "adamw", "background"),  # async_copy: background
    ("fsdp2", "torch", "sgd_momentum", False),
    ("fsdp2", "dcp", "adamw", False),
    ("fsdp2", "dcp", "sgd", False),
]
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
}

_data = torch.Generator().manual_seed(0)
X = torch.randn(512, 16, generator=_data)
Y = torch.randn(512, 4, generator=_data)
DEVICE = torch.device("cpu")  # cuda:LOCAL_RANK with the "cuda" option (benchmarks/gpu_checks.py)


class Sampler:
    """This rank's batches: indices drawn from a generator of its own."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.fail_on_save = False

    def next(self) -> torch.Tensor:
        return torch.randint(0, len(X), (8,), generator=self.gen)

    def state_dict(self) -> dict:
        if self.fail_on_save:
            self.fail_on_save = False
            raise OSError("the data loader's worker died")
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])


def name_of(case) -> str:
    wrap, fmt, opt, is_async = case
    return f"{wrap}-{fmt}-{opt}" + ("-async" if is_async else "") + ("-background" if is_async == "background" else "")


def config(workdir: str, case, **distributed) -> dict:
    _, fmt, _, is_async = case
    cfg = {"backends": {"disk": {"type": "local", "path": os.path.join(workdir, "ckpts")}},
           "roles": {"resume": {"backends": ["disk"], "every_n_steps": EVERY, "keep_last": 2,
                                "format": fmt, "async": bool(is_async)}}}
    if isinstance(is_async, str):
        cfg["roles"]["resume"]["async_copy"] = is_async
    if distributed:
        cfg["distributed"] = distributed
    return cfg


def build(wrap: str, opt_name: str):
    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(32, 4)).to(DEVICE)
    if wrap == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif wrap == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(DEVICE.type, (dist.get_world_size(),))
        fully_shard(model[0], mesh=mesh)
        model = fully_shard(model, mesh=mesh)
    opt = OPTIMIZERS[opt_name](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    return model, opt, sched


def train(case, workdir: str, resume: bool, die_after: int | None = None, fail_at: int | None = None) -> dict:
    wrap, _, opt_name, _ = case
    rank = ranks.rank()
    model, opt, sched = build(wrap, opt_name)
    sampler = Sampler(seed=100 + rank)
    rng = ckptkit.RngState()
    torch.manual_seed(10 + rank)  # dropout differs per rank
    ck = ckptkit.CheckpointManager.from_config(config(workdir, case), run_name=name_of(case))
    start, errors = 0, []
    if resume:
        restored = ck.restore(model, opt, extra={"sched": sched}, rank_extra={"sampler": sampler, "rng": rng})
        start = restored.step if restored else 0
    losses = {}
    for step in range(start + 1, STEPS + 1):
        idx = sampler.next()
        loss = (model(X[idx].to(DEVICE)) - Y[idx].to(DEVICE)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses[step] = loss.item()
        if step == fail_at and rank == 1:
            sampler.fail_on_save = True
        try:
            ck.save(step, model, opt, extra={"sched": sched}, rank_extra={"sampler": sampler, "rng": rng})
        except ckptkit.CkptkitError as exc:
            # What a loop that catches save's errors sees: the same failure on every rank.
            errors.append([step, type(exc).__name__, str(exc)])
        except OSError as exc:
            errors.append([step, type(exc).__name__, str(exc)])
        if die_after is not None and step == die_after + 1:
            os.kill(os.getpid(), signal.SIGKILL)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ck.close()
    if rank == 0:
        torch.save(full, os.path.join(workdir, f"final-{name_of(case)}.pt"))
    return {"start": start, "losses": losses, "errors": errors}


def steps_differ(workdir: str, case, result: dict) -> tuple[weakref.ref, ...]:
    """Rank 1 saves one step ahead of rank 0. Returns weak references to the model and the
    manager: an error kept with its traceback would keep both, and the process groups they use,
    alive to the interpreter's end, where tearing a process group down can abort the process."""
    model, opt, _ = build(case[0], case[2])
    ck = ckptkit.CheckpointManager.from_config(config(workdir, case), run_name="steps")
    try:
        ck.save(EVERY + ranks.rank(), model, opt, force=True)
        result["raised"] = None
    except ckptkit.CkptkitError as exc:
        result["raised"] = [type(exc).__name__, str(exc)]
    try:  # once out of step, every later call fails at once instead of pairing wrong calls
        ck.save(2 * EVERY, model, opt)
        result["later"] = None
    except ckptkit.CkptkitError as exc:
        result["later"] = [type(exc).__name__, str(exc)]
    group = ck.coll.group
    ck.close()
    try:
        dist.destroy_process_group(group)
        result["group_destroyed_by_close"] = False
    except ValueError:  # "Invalid process group specified": gone already
        result["group_destroyed_by_close"] = True
    return weakref.ref(model), weakref.ref(ck)


def exited_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return True
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return False


def main() -> None:
    scenario, workdir = sys.argv[1], sys.argv[2]
    opts = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    global DEVICE
    if opts.get("cuda"):
        DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(DEVICE)
    dist.init_process_group("nccl" if opts.get("cuda") else "gloo")
    rank = ranks.rank()
    result: dict = {"rank": rank}
    cases = [tuple(c) for c in opts.get("cases", CASES)]

    if scenario == "uninterrupted":
        for case in cases:
            result[name_of(case)] = train(case, workdir, resume=False)
    elif scenario == "killed":
        # Every case runs to one step past a save; the last one then dies by SIGKILL (all
        # ranks), leaving no chance to close anything.
        for i, case in enumerate(cases):
            train(case, workdir, resume=False, die_after=opts["die_after"] if i == len(cases) - 1 else None)
    elif scenario == "resumed":
        for case in cases:
            result[name_of(case)] = train(case, workdir, resume=True)
    elif scenario == "caught":
        # Rank 1's sampler fails inside save at one step, and the loop catches the error.
        for case in cases:
            result[name_of(case)] = train(case, workdir, resume=False, fail_at=opts["fail_at"])
    elif scenario == "configs_differ":
        case = cases[0]
        cfg = config(workdir, case)
        cfg["roles"]["resume"]["every_n_steps"] = EVERY + rank  # rank 1 saves on another schedule
        try:
            ckptkit.CheckpointManager.from_config(cfg, run_name="differ")
            result["raised"] = None
        except ckptkit.CkptkitError as exc:
            result["raised"] = [type(exc).__name__, str(exc)]
    elif scenario == "steps_differ":
        # The first DDP model of a process imports modules whose frames torch keeps, and with them
        # their callers' frames: built once out here, that chain does not reach steps_differ's locals.
        build(*cases[0][0:3:2])
        gc.disable()  # what is freed below is freed by reference counts alone
        refs = steps_differ(workdir, cases[0], result)
        result["freed"] = [ref() is None for ref in refs]
        gc.enable()
    elif scenario == "forked_close":
        # A data loader's worker, forked while an async save is in flight, closes its copy of the
        # manager: that must neither wait for the parent's save nor touch the parent's group.
        case = next(c for c in cases if c[3] is True)
        model, opt, _ = build(case[0], case[2])
        ck = ckptkit.CheckpointManager.from_config(config(workdir, case), run_name="forked")
        ck.save(EVERY, model, opt)
        if rank == 0:
            child = os.fork()
            if child == 0:  # the manager holds the only reference to the group, as in a trainer
                ck.close()
                os._exit(0)
            result["forked_close_returned"] = exited_within(child, 30)
        dist.barrier()  # rank 1 keeps its end of the group open meanwhile
        ck.close()
        ck = ckptkit.CheckpointManager.from_config(config(workdir, case), run_name="forked")
        result["steps"] = [r.step for r in ck.list_checkpoints()]
        ck.close()
    elif scenario == "finalize_refused":
        case = cases[0]
        model, opt, _ = build(case[0], case[2])
        cfg = config(workdir, case)
        cfg["backends"]["final"] = {"type": "local", "path": os.path.join(workdir, "final")}
        cfg["roles"]["final"] = {"backends": ["final"]}
        ck = ckptkit.CheckpointManager.from_config(cfg, run_name="fin")
        try:  # the usual idiom: extra given on rank 0 only, and refused there
            ck.finalize(model, step=1, extra={"f": (lambda: 0)} if rank == 0 else None)
            result["raised"] = None
        except ckptkit.CkptkitError as exc:
            result["raised"] = [type(exc).__name__, str(exc)]
        result["published"] = [r.uri for r in ck.finalize(model, step=1)]
        ck.close()
        result["wait_after_close"] = ck.wait()
        groups = len(dist.distributed_c10d._world.pg_map)  # no public count of a job's groups
        try:  # a collective after close raises instead of making the group again
            ck.coll.group
            result["group_after_close"] = None
        except ckptkit.CkptkitError as exc:
            result["group_after_close"] = str(exc)
        result["groups_made_after_close"] = len(dist.distributed_c10d._world.pg_map) - groups
    elif scenario == "frozen":
        case = cases[0]
        model, opt, _ = build(case[0], case[2])
        ck = ckptkit.CheckpointManager.from_config(config(workdir, case, timeout_s=opts["timeout_s"]),
                                                   run_name="frozen")
        done = os.path.join(workdir, "rank0-done")
        if rank == 1:
            while not os.path.exists(done):  # frozen until rank 0 has seen its error
                time.sleep(0.1)
            with open(os.path.join(workdir, f"result-{scenario}-{rank}.json"), "w") as f:
                json.dump({"rank": rank, "frozen": True}, f)
            os._exit(0)
        began = time.monotonic()
        try:
            ck.save(EVERY, model, opt)
            result["raised"] = None
        except ckptkit.CkptkitError as exc:
            result["raised"] = [type(exc).__name__, str(exc)]
        result["waited_s"] = time.monotonic() - began
        with open(os.path.join(workdir, f"result-{scenario}-{rank}.json"), "w") as f:
            json.dump(result, f)
        open(done, "w").close()
        os._exit(0)

    with open(os.path.join(workdir, f"result-{scenario}-{rank}.json"), "w") as f:
        json.dump(result, f)
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
