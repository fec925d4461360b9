#!/usr/bin/env python
"""A training script to copy: ckptkit checkpoints with exact resume, on one process or many.

    python examples/train.py --config examples/train.yaml --run-name exp-1
    torchrun --nproc-per-node 2 examples/train.py --config examples/train.yaml --run-name exp-1
    python examples/train.py --config examples/train.yaml --run-name exp-1 --dry-run

Under torchrun the model is sharded with FSDP2 (``fully_shard``) over gloo on CPUs, or NCCL
when CUDA is available. A killed job started again with the same command continues where its
newest checkpoint left off and trains exactly as if it had never stopped: same batches on every
rank, same dropout masks, same learning rate, same weights, bit for bit.

What goes where, the ckptkit way:
  * model, optimizer            -> save(model=, optimizer=), sharded or gathered by ckptkit
  * LR scheduler, model args    -> extra= (shared: rank 0's is saved, every rank gets it back)
  * RNG state, the data sampler -> rank_extra= (each rank saves and gets back its own)
  * model args before the model -> peek() reads them from the newest checkpoint

The config file holds the trainer's settings and ckptkit's own config (inline, or a path):

    model: {dim: 16, hidden: 64, classes: 4, dropout: 0.1}
    train: {steps: 200, batch_size: 32, lr: 0.01, seed: 0, dataset_size: 4096}
    ckptkit:                # see docs/config.md; or: ckptkit: ckptkit.yaml
      backends: {scratch: {type: local, path: ./checkpoints}}
      roles: {resume: {backends: [scratch], every_n_steps: 50, keep_last: 3}}
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import Any

import attrs
import torch
import torch.distributed as dist
import yaml

import ckptkit

log = logging.getLogger("train")


# -- settings -------------------------------------------------------------------------------

def _from_dict(cls, data: Any, key: str):
    """An attrs class from a mapping; an unknown key is an error that names it."""
    if not isinstance(data, dict):
        raise ckptkit.ConfigError(f"{key}: must be a mapping, got {type(data).__name__}")
    known = {f.name for f in attrs.fields(cls)}
    for k in data:
        if k not in known:
            raise ckptkit.ConfigError(f"{key}.{k}: unknown key (allowed: {', '.join(sorted(known))})")
    return cls(**data)


@attrs.frozen
class ModelArgs:
    dim: int = 16
    hidden: int = 64
    classes: int = 4
    dropout: float = 0.1


@attrs.frozen
class TrainArgs:
    steps: int = 200
    batch_size: int = 32
    lr: float = 0.01
    seed: int = 0
    dataset_size: int = 4096


@attrs.frozen
class Settings:
    model: ModelArgs
    train: TrainArgs
    ckptkit: ckptkit.Config

    @classmethod
    def from_file(cls, path: str) -> Settings:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        for k in data:
            if k not in ("model", "train", "ckptkit"):
                raise ckptkit.ConfigError(f"{path}: {k}: unknown key (allowed: model, train, ckptkit)")
        if "ckptkit" not in data:
            raise ckptkit.ConfigError(f"{path}: ckptkit: required (ckptkit's config, or the path of its YAML)")
        section = data["ckptkit"]
        if isinstance(section, str):  # a path, relative to this file
            section = os.path.join(os.path.dirname(os.path.abspath(path)), section)
        return cls(model=_from_dict(ModelArgs, data.get("model") or {}, "model"),
                   train=_from_dict(TrainArgs, data.get("train") or {}, "train"),
                   ckptkit=ckptkit.Config.load(section))


# -- model and data -------------------------------------------------------------------------

def build_model(args: ModelArgs) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(args.dim, args.hidden), torch.nn.ReLU(), torch.nn.Dropout(args.dropout),
        torch.nn.Linear(args.hidden, args.classes))


def make_dataset(train: TrainArgs, model: ModelArgs, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic dataset, the same on every rank (as files on disk would be)."""
    gen = torch.Generator().manual_seed(train.seed)
    x = torch.randn(train.dataset_size, model.dim, generator=gen)
    teacher = torch.randn(model.dim, model.classes, generator=gen)
    return x.to(device), (x @ teacher).argmax(dim=1).to(device)


class RandomBatches:
    """This rank's sampler: draws batch indices with a generator of its own.

    Its state (the generator and how many batches it gave) is per rank, so it goes in
    ``rank_extra``; in ``extra`` every rank would get rank 0's back and draw rank 0's batches.
    """

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size, self.batch_size = size, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.batches = 0

    def next(self) -> torch.Tensor:
        self.batches += 1
        return torch.randint(0, self.size, (self.batch_size,), generator=self.generator)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.batches = state["batches"]


# -- distributed ----------------------------------------------------------------------------

def start_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); a process group only when launched by torchrun."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "RANK" not in os.environ:
        return 0, 1, device
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2: each Linear is its own unit, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model on rank 0 (empty elsewhere), on the CPU."""
    if not dist.is_initialized():
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def mean_over_ranks(value: torch.Tensor) -> float:
    if dist.is_initialized():
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


# -- the run --------------------------------------------------------------------------------

def dry_run(settings: Settings, args: argparse.Namespace) -> int:
    """Check the config and show the routing; no file, no process group, no network."""
    # from_config checks the whole ckptkit config and builds every backend (offline), as
    # `ckptkit check` does; listing checkpoints would touch storage, so it is left out.
    ck = ckptkit.CheckpointManager.from_config(settings.ckptkit, run_name=args.run_name)
    try:
        world = int(os.environ.get("WORLD_SIZE", 1))
        print(f"config OK: run {ck.run_name!r}, {settings.train.steps} steps on {world} rank(s)"
              + (" with FSDP2" if world > 1 else "") + f", model {attrs.asdict(settings.model)}")
        for role in ckptkit.Role:
            rc = ck.config.role(role)
            if rc is None:
                print(f"  {role.value}: not configured")
                continue
            where = ", ".join(f"{n} ({ck.config.backends[n].type}: {ck.config.backends[n].options.get('path', '')})"
                              for n in rc.backends)
            detail = (f", every {rc.every_n_steps} steps, keep_last {rc.keep_last}, format {rc.format}"
                      if role is ckptkit.Role.RESUME else "")
            print(f"  {role.value}: {where}{detail}")
        mode = {"auto": "restore the newest checkpoint if there is one",
                "none": "start from step 0 (refused at the first save if the run holds checkpoints)"}
        print(f"  --resume {args.resume}: would {mode.get(args.resume, f'restore step {args.resume}')} "
              "(storage not read in a dry run)")
    finally:
        ck.close()
    return 0


def train(settings: Settings, args: argparse.Namespace) -> int:
    rank, world, device = start_distributed()
    ck = ckptkit.CheckpointManager.from_config(settings.ckptkit, run_name=args.run_name)
    try:
        return _train(ck, settings, args, rank, world, device)
    finally:
        ck.close()
        if dist.is_initialized():
            dist.barrier()  # leave together: one rank tearing gloo down can abort another
            dist.destroy_process_group()


def _train(ck: ckptkit.CheckpointManager, settings: Settings, args: argparse.Namespace,
           rank: int, world: int, device: torch.device) -> int:
    train_args = settings.train
    model_args = settings.model
    if args.resume != "none":
        # The model must be built before restore fills it: take its args from the checkpoint.
        info = ck.peek()
        if info is not None and "model_args" in info.extra:
            saved = ModelArgs(**info.extra["model_args"])
            if saved != model_args and rank == 0:
                log.warning("the checkpoint of step %d was trained with %s; using those, not the config's %s",
                            info.step, attrs.asdict(saved), attrs.asdict(model_args))
            model_args = saved
        if args.resume != "auto":
            wanted = int(args.resume)
            if info is None or info.step != wanted:
                # ckptkit restores the newest intact checkpoint of a run; asking for another
                # step must not silently train from a different one.
                raise ckptkit.CkptkitError(
                    f"--resume {wanted}: run {ck.run_name!r}'s newest checkpoint is "
                    f"{'none' if info is None else f'step {info.step}'}; only the newest can be resumed")

    torch.manual_seed(train_args.seed)  # the same initial weights on every rank
    model = build_model(model_args).to(device)
    if world > 1:
        model = shard(model, device)
    opt = torch.optim.AdamW(model.parameters(), lr=train_args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=train_args.steps)
    x_all, y_all = make_dataset(train_args, model_args, device)
    batches = RandomBatches(train_args.dataset_size, train_args.batch_size, seed=train_args.seed + 1 + rank)
    torch.manual_seed(train_args.seed + 1000 + rank)  # dropout and input noise differ per rank
    rng = ckptkit.RngState()  # Python, numpy, torch CPU and CUDA generators, read at save time

    start = 0
    loss_value = float("nan")
    if args.resume != "none":
        # After everything that seeds or draws, so that the restored generators are the ones used.
        restored = ck.restore(model=model, optimizer=opt, extra={"sched": sched},
                              rank_extra={"rng": rng, "batches": batches})
        if args.resume not in ("auto", "none") and (restored is None or restored.step != int(args.resume)):
            raise ckptkit.CkptkitError(f"--resume {args.resume}: restored "
                                       f"{'nothing' if restored is None else f'step {restored.step}'} instead")
        if restored is not None:
            start = restored.step + 1
            loss_value = float(restored.metrics.get("loss", loss_value))
            if rank == 0:
                print(f"resumed run {ck.run_name!r} from step {restored.step} ({restored.ref.uri})", flush=True)

    losses = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        losses = open(os.path.join(args.out, f"losses-rank{rank}.jsonl"), "a", encoding="utf-8")
    steps_per_epoch = max(1, train_args.dataset_size // (train_args.batch_size * world))
    last = train_args.steps - 1
    for step in range(start, train_args.steps):
        epoch = step // steps_per_epoch
        model.train()
        idx = batches.next().to(device)
        x = x_all[idx] + 0.05 * torch.randn(idx.numel(), model_args.dim, device=device)  # input noise
        loss = torch.nn.functional.cross_entropy(model(x), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        loss_value = mean_over_ranks(loss)
        if losses is not None:
            losses.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
            losses.flush()
        # Called every step; it saves only when due (and at the last step, forced).
        saved = ck.save(step=step, epoch=epoch, model=model, optimizer=opt, metrics={"loss": loss_value},
                        extra={"sched": sched, "model_args": attrs.asdict(model_args)},
                        rank_extra={"rng": rng, "batches": batches}, force=step == last)
        if rank == 0 and (args.verbose or saved):
            print(f"step {step} epoch {epoch} loss {loss_value:.4f}"
                  + (f" saved to {', '.join(r.uri for r in saved)}" if saved else ""), flush=True)
        if args.die_after_step is not None and step == args.die_after_step:
            if dist.is_initialized():
                dist.barrier()  # every rank has logged this step before any of them dies
            os.kill(os.getpid(), signal.SIGKILL)  # a crash, for the tests: nothing runs after this
    if losses is not None:
        losses.close()

    if start > last and rank == 0:
        # Killed after its last save, maybe inside finalize: the final model is published again
        # (a registry records another version), never left unpublished.
        print(f"run {ck.run_name!r} already trained to step {last}; nothing to train, publishing the final "
              "model", flush=True)
    weights = full_weights(model)  # a collective under FSDP2: every rank takes part
    if args.out and rank == 0:
        torch.save(weights, os.path.join(args.out, "final_weights.pt"))
    if ck.config.final is not None:
        ck.finalize(model=model, step=last, epoch=last // steps_per_epoch, metrics={"loss": loss_value},
                    params=attrs.asdict(model_args))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a small model with ckptkit checkpoints (see the module docstring).")
    p.add_argument("--config", required=True, help="the trainer's YAML: model, train and ckptkit sections")
    p.add_argument("--run-name", help="the run (default: the ckptkit config's run_name, else 'default')")
    p.add_argument("--resume", default="auto",
                   help="auto: continue from the newest checkpoint if any (default); none: start from step 0 "
                        "(refused if the run holds checkpoints); STEP: continue from that step, which must be "
                        "the newest checkpoint")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config and show the routing; write nothing, connect to nothing")
    p.add_argument("--verbose", action="store_true", help="a line per step, and ckptkit's log")
    p.add_argument("--out", help="write each rank's losses (losses-rank<R>.jsonl) and the final weights "
                                 "(final_weights.pt) to this folder")
    p.add_argument("--die-after-step", type=int, help=argparse.SUPPRESS)  # tests: SIGKILL after this step
    args = p.parse_args(argv)
    if args.resume not in ("auto", "none") and not args.resume.isdigit():
        p.error(f"--resume: auto, none or a step number, got {args.resume!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("ckptkit").setLevel(logging.DEBUG)
    try:
        settings = Settings.from_file(args.config)
        return dry_run(settings, args) if args.dry_run else train(settings, args)
    except (ckptkit.CkptkitError, OSError, yaml.YAMLError) as exc:
        print(f"train.py: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
