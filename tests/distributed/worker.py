"""Run by torchrun from test_distributed.py: one scenario per launch, results as JSON per rank.

Usage: torchrun --nproc-per-node N worker.py SCENARIO WORKDIR [OPTIONS_JSON]
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import types
import warnings

import torch
import torch.distributed as dist

import ckptkit
from ckptkit import gather, ranks, reading, sharded
from ckptkit.plugins import make_plugin_manager


class UnusedHead(torch.nn.Sequential):
    """Runs its layers but the last, a head whose parameters never get a gradient (so no
    optimizer state either)."""

    def forward(self, x):
        for layer in list(self)[:-1]:
            x = layer(x)
        return x


class WithExtraState(torch.nn.Identity):
    """A module whose state dict holds a value that is not a tensor (``_extra_state``)."""

    def get_extra_state(self):
        return {"calls": 1}

    def set_extra_state(self, state) -> None:
        pass


class PickyExtraState(WithExtraState):
    """Refuses its saved extra state on rank 0 only, once the broadcast is over."""

    def set_extra_state(self, state) -> None:
        if ranks.rank() == 0:
            raise RuntimeError("rank 0 cannot take this extra state")


class RenamedWeight(torch.nn.Module):
    """Holds its weight in a submodule and saves it as its own, naming the submodule in
    ``_fqn_modifiers`` as DCP asks."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(10, 16)
        self._register_state_dict_hook(RenamedWeight._saving)
        self._register_load_state_dict_pre_hook(RenamedWeight._loading, with_module=True)

    @staticmethod
    def _saving(module, state, prefix, *args):
        state[prefix + "weight"] = state.pop(prefix + "embedding.weight")

    def _loading(self, state, prefix, *args):
        if prefix + "weight" in state:
            state[prefix + "embedding.weight"] = state.pop(prefix + "weight")

    def _fqn_modifiers(self):
        return {"weight": "embedding"}

    def forward(self, x):
        return self.embedding(x)


def model_factory(seed: int, unused: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)]
    return UnusedHead(*layers, torch.nn.Linear(8, 8)) if unused else torch.nn.Sequential(*layers)


DEVICE = torch.device("cpu")


def wrap(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    model = model.to(DEVICE)
    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=isinstance(model, UnusedHead))
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


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),  # stateless
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=0.1),
    # AdamW on a model whose head never gets a gradient, so has no optimizer state.
    "adamw_unusedhead": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
}


def matrix_names(wraps=("ddp", "fsdp2")) -> list[str]:
    return [f"{w}-{f}-{o}" for w in wraps for f in ("torch", "dcp") for o in OPTIMIZERS]


MATRIX = matrix_names()
SAVED_AT = 3


def matrix_parts(name: str, cfg: dict, seed: int, as_plain: bool = False):
    """A combination's manager config, model, optimizer and LR scheduler, built fresh."""
    kind, fmt, optimizer = name.split("-")
    cfg = json.loads(json.dumps(cfg))
    cfg["run_name"] = name
    cfg["roles"]["resume"].update(format=fmt, every_n_steps=SAVED_AT)
    model = wrap(model_factory(seed, unused=optimizer.endswith("_unusedhead")), "plain" if as_plain else kind)
    opt = OPTIMIZERS[optimizer](model.parameters())
    return cfg, model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def matrix_manager(cfg: dict) -> ckptkit.CheckpointManager:
    # Only the built-in local backend: loading every installed plugin costs seconds per launch.
    return ckptkit.CheckpointManager.from_config(cfg, plugin_manager=make_plugin_manager(autoload=False))


def matrix_train(model, opt, sched, steps: range) -> list[float]:
    losses = []
    for step in steps:
        torch.manual_seed(1000 + step + 100 * ranks.rank())  # each rank its own data
        loss = model(torch.randn(4, 16).to(DEVICE)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def full_state(model, opt) -> dict:
    """Model and optimizer state by parameter name, whole on rank 0 (empty elsewhere), copied."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True) if dist.is_initialized() else None
    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    return copy.deepcopy({"model": model_sd, "optimizer": optim_sd})


def differences(a, b, path: str = "") -> list[str]:
    """Where two nested states differ (tensors exactly, other values with ==)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}/{i}")]
    if torch.is_tensor(a) and torch.is_tensor(b):
        return [] if a.dtype == b.dtype and torch.equal(a, b) else [path]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def matrix_restore(name: str, cfg: dict, workdir: str, as_plain: bool = False, run: str | None = None):
    """Restore a combination (from its own run, or ``run``) into a fresh model; this rank's
    report and the restored parts."""
    cfg, model, opt, sched = matrix_parts(name, cfg, seed=9, as_plain=as_plain)
    cfg["run_name"] = run or name
    ck = matrix_manager(cfg)
    restored = ck.restore(model=model, optimizer=opt, extra={"sched": sched})
    ck.close()
    report = {"step": restored.step, "sched_epoch": sched.last_epoch}
    state = full_state(model, opt)
    ref = None
    if ranks.rank() == 0:
        ref = torch.load(os.path.join(workdir, f"ref-{name}.pt"), weights_only=True)
        report["diffs"] = differences(ref["at_save"], state)
    return report, (cfg, model, opt, sched, ref)


def mapped_under(folder: str) -> list[str]:
    """The files under ``folder`` that this process has memory-mapped (Linux)."""
    with open("/proc/self/maps") as f:
        return sorted({line.split()[-1] for line in f if str(folder) in line})


def saved_after_one_step(cfg: dict, kind: str) -> torch.nn.Module:
    """A model trained one step and saved (step 0) with its optimizer; the manager closed."""
    ck = ckptkit.CheckpointManager.from_config(cfg)
    model, opt = build(kind, seed=0)
    train(model, opt, steps=1, ck=ck)
    ck.close()
    return model


def damage(path: str) -> None:
    """Flip one byte in the middle of the file at ``path``."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def faulty_pm():
    """A plugin manager with the fault-injecting ``faultyfs`` type of tests/trust/faults.py."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "trust"))
    from faults import FaultyFileBackend

    pm = make_plugin_manager(autoload=False)
    pm.add_backend_type("faultyfs", FaultyFileBackend)
    return pm


def restore_raised(ck, model, opt) -> list[str] | None:
    """The type and text of the ckptkit error that ``restore`` raised, or None."""
    try:
        ck.restore(model=model, optimizer=opt)
    except ckptkit.CkptkitError as exc:
        return [type(exc).__name__, str(exc)]
    return None


def main() -> None:
    scenario, workdir = sys.argv[1], sys.argv[2]
    opts = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    # These small states load through a mapping, as large ones do, so that the scenarios that
    # check that no file stays mapped after a restore check something. Set here, not on import:
    # the tests import this module into their own process too.
    reading._MAP_MIN = 0
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
        # How many staging buffers this rank set out to make, call by call, ahead of the first save.
        prepared, prepare = [], ck._async._stager.prepare
        ck._async._stager.prepare = lambda likes: (prepared.append(len(likes)), prepare(likes))
        assert ck.restore(model=model, optimizer=opt) is None  # a new training
        train(model, opt, steps=4, ck=ck)
        result["prepared"] = prepared
        expected = snapshot(model, opt)
        full = full_model_state(model)
        ck.wait()  # an asynchronous save may still be writing
        result["kept"] = [r.step for r in ck.list_checkpoints()] if rank == 0 else None
        model2, opt2 = build(kind, seed=7)
        restored = ck.restore(model=model2, optimizer=opt2)
        result["restored_step"] = restored.step
        result["extra"] = restored.extra
        result["diffs"] = same(expected, snapshot(model2, opt2))
        result["mapped"] = mapped_under(workdir)
        refs = ck.finalize(model=model2, step=restored.step, metrics={"loss": 0.5})
        result["final"] = [r.uri for r in refs]
        if rank == 0:
            torch.save(full, os.path.join(workdir, "expected_full.pt"))
        ck.close()

    elif scenario == "groups_unread_on_one_rank":
        # Saved by an optimizer over the last layer only; restored into one over every parameter,
        # with the saved param groups' items unreadable on rank 1 alone.
        ck = ckptkit.CheckpointManager.from_config(cfg)
        model, _ = build(kind, seed=0)
        head = torch.optim.AdamW(list(model.parameters())[-2:], lr=1e-2)
        train(model, head, steps=1, ck=ck)
        ck.close()
        if rank == 1:
            def unreadable(r):
                raise OSError("the shared filesystem hiccuped")

            sharded.saved_param_groups = unreadable
        ck = ckptkit.CheckpointManager.from_config(cfg)
        result["raised"] = restore_raised(ck, *build(kind, seed=1))
        ck.close()

    elif scenario == "model_misfit_full":
        # Restored into models of other layouts: a head of another shape, a layer more (no
        # optimizer), a layer fewer, a module that saved extra state now without it; then into
        # the model that saved it. Every rank hears each refusal and the ranks still meet.
        saved = saved_after_one_step(cfg, kind)
        ck = ckptkit.CheckpointManager.from_config(cfg)
        layers = list(model_factory(1))
        other_head = wrap(torch.nn.Sequential(*layers[:-1], torch.nn.Linear(64, 9)), kind)
        result["shape"] = restore_raised(ck, other_head, torch.optim.AdamW(other_head.parameters()))
        longer = wrap(torch.nn.Sequential(*model_factory(1), torch.nn.Linear(8, 8)), kind)
        result["missing"] = restore_raised(ck, longer, None)
        shorter = wrap(torch.nn.Sequential(*model_factory(1)[:-1]), kind)
        result["unknown"] = restore_raised(ck, shorter, torch.optim.AdamW(shorter.parameters()))
        model, opt = build(kind, seed=1)
        result["fits"] = restore_raised(ck, model, opt)
        a, b = full_model_state(saved), full_model_state(model)
        result["same_model"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        ck.close()
        # Refused by rank 0's own load, after the broadcast: every rank's optimizer is left as it was.
        ck = ckptkit.CheckpointManager.from_config({**cfg, "run_name": "extra-state"})
        with_extra = wrap(torch.nn.Sequential(WithExtraState(), *model_factory(0)), kind)
        opt = torch.optim.AdamW(with_extra.parameters())
        train(with_extra, opt, steps=1)
        ck.save(step=0, model=with_extra, optimizer=opt)
        without = wrap(torch.nn.Sequential(torch.nn.Identity(), *model_factory(1)), kind)
        opt = torch.optim.AdamW(without.parameters())
        result["extra_state"] = restore_raised(ck, without, opt)
        result["optimizer_after"] = len(opt.state)
        # A module that takes its saved extra state on one rank and refuses it on rank 0.
        picky = wrap(torch.nn.Sequential(PickyExtraState(), *model_factory(1)), kind)
        try:
            ck.restore(model=picky, optimizer=torch.optim.AdamW(picky.parameters()))
            result["picky"] = None
        except Exception as exc:
            result["picky"] = [type(exc).__name__, str(exc)]
        ck.close()
        # Two param groups saved; restored into one group of them all and one without parameters.
        ck = ckptkit.CheckpointManager.from_config({**cfg, "run_name": "groups"})
        model = wrap(model_factory(0), kind)
        params = list(model.parameters())
        opt = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}])
        train(model, opt, steps=1)
        ck.save(step=0, model=model, optimizer=opt)
        model = wrap(model_factory(1), kind)
        result["empty_group"] = restore_raised(ck, model, torch.optim.AdamW(
            [{"params": list(model.parameters())}, {"params": [], "weight_decay": 0.0}]))
        ck.close()
        # A module that renames its weight in its state dict, telling DCP so (torchtune's fused embedding).
        ck = ckptkit.CheckpointManager.from_config({**cfg, "run_name": "renamed"})
        ck.save(step=0, model=wrap(torch.nn.Sequential(RenamedWeight(), torch.nn.Linear(16, 4)), kind))
        result["renamed"] = restore_raised(ck, wrap(torch.nn.Sequential(RenamedWeight(), torch.nn.Linear(16, 4)), kind),
                                           None)
        ck.close()

    elif scenario == "load_target_fails_on_one_rank":
        # Making the optimizer state a sharded load fills runs out of memory on rank 1 alone.
        saved_after_one_step(cfg, kind)
        if rank == 1:
            def out_of_memory(*args, **kwargs):
                raise RuntimeError("out of memory while making the optimizer's state")

            gather.resume_state = out_of_memory
        ck = ckptkit.CheckpointManager.from_config(cfg)
        try:
            ck.restore(*build(kind, seed=1))
            result["raised"] = None
        except Exception as exc:  # rank 1 gets its own RuntimeError back, the others its text
            result["raised"] = [type(exc).__name__, str(exc)]
        ck.close()

    elif scenario == "refused_on_one_rank":
        # Rank 1 may not read a file of the newest step (its permissions), which only rank 1
        # checks: every rank must refuse to restore the step before it.
        ck = ckptkit.CheckpointManager.from_config(cfg, plugin_manager=faulty_pm())
        train(*build(kind, seed=0), steps=2, ck=ck)
        ck.close()
        ck = ckptkit.CheckpointManager.from_config(cfg, plugin_manager=faulty_pm())
        if rank == 1:
            armed = ck.router.instances["flaky"].faults.add(op="open_read", path="step-0000000001/", error="EACCES",
                                                             times=None)
        result["raised"] = restore_raised(ck, *build(kind, seed=1))
        result["fired"] = armed.fired if rank == 1 else None
        ck.close()

    elif scenario == "skip_warning_as_error":
        # The newest step is damaged; every rank runs with warnings as errors (-W error). Rank 0's
        # warning that it skipped that step must not keep the others waiting for it.
        ck = ckptkit.CheckpointManager.from_config(cfg)
        train(*build(kind, seed=0), steps=2, ck=ck)
        ck.close()
        if rank == 0:
            damage(os.path.join(cfg["backends"]["local"]["path"], cfg["run_name"], "step-0000000001", "state.pt"))
        dist.barrier()
        ck = ckptkit.CheckpointManager.from_config(cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                result["restored_step"] = ck.restore(*build(kind, seed=1)).step
            except Exception as exc:
                result["raised"] = [type(exc).__name__, str(exc)]
        ck.close()

    elif scenario == "scratch_fails_on_one_rank":
        # Rank 1's temporary folder cannot hold a scratch folder: every rank raises that at once,
        # rather than rank 0 waiting for rank 1 in the next collective until the timeout.
        import tempfile

        ck = ckptkit.CheckpointManager.from_config(cfg, plugin_manager=faulty_pm())
        train(*build(kind, seed=0), steps=1, ck=ck)
        ck.close()
        if rank == 1:
            not_a_folder = os.path.join(workdir, "not-a-folder")
            with open(not_a_folder, "w") as f:
                f.write("a file where the temporary folder should be")
            tempfile.tempdir = not_a_folder
        ck = ckptkit.CheckpointManager.from_config(cfg, plugin_manager=faulty_pm())
        result["raised"] = restore_raised(ck, *build(kind, seed=1))
        ck.close()

    elif scenario == "extra_target_fails_on_one_rank":
        # rank 1's own object refuses its saved state: every rank's restore raises, none trains on.
        ck = ckptkit.CheckpointManager.from_config(cfg)
        model, opt = build(kind, seed=0)
        ck.save(step=0, model=model, optimizer=opt, extra={"shared": torch.optim.lr_scheduler.StepLR(opt, 1)},
                rank_extra={"position": torch.optim.lr_scheduler.StepLR(opt, 2)}, force=True)
        ck.close()

        class Refusing:
            def load_state_dict(self, state):
                raise ValueError("this loader cannot go back to that position")

        model2, opt2 = build(kind, seed=1)
        ck = ckptkit.CheckpointManager.from_config(cfg)
        try:
            ck.restore(model2, opt2, rank_extra={"position": Refusing() if rank == 1 else
                                                 torch.optim.lr_scheduler.StepLR(opt2, 2)})
            result["raised"] = None
        except Exception as exc:
            result["raised"] = [type(exc).__name__, str(exc)]
        ck.close()

    elif scenario == "optimizer_on_rank0_only":
        # DCP takes another state dict on each rank; ckptkit's checks before the load must still
        # meet on every rank (a rank without optimizer has nothing to check, but must be there).
        model = saved_after_one_step(cfg, kind)
        model2, opt2 = build(kind, seed=1)
        ck = ckptkit.CheckpointManager.from_config(cfg)
        restored = ck.restore(model=model2, optimizer=opt2 if rank == 0 else None)
        result["restored_step"] = restored.step
        a, b = full_model_state(model), full_model_state(model2)
        result["same_model"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        result["optimizer_state"] = len(opt2.state)
        ck.close()

    elif scenario == "save_optimizer_on_rank0_only":
        # A sharded model's optimizer state is gathered collectively: rank 1 without one left
        # rank 0 in torch's gather for the model's own timeout.
        ck = ckptkit.CheckpointManager.from_config(cfg)
        model, opt = build(kind, seed=0)
        train(model, opt, steps=1)
        try:
            ck.save(step=1, model=model, optimizer=opt if rank == 0 else None)
            result["raised"] = None
        except ckptkit.CkptkitError as exc:
            result["raised"] = [type(exc).__name__, str(exc)]
        result["listed"] = [r.step for r in ck.list_checkpoints()]
        ck.close()

    elif scenario == "restore_extra_on_rank0_only":
        # A scheduler passed to restore on rank 0 only: rank 1's stayed fresh, without a word.
        model, opt = build(kind, seed=0)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        with ckptkit.CheckpointManager.from_config(cfg) as ck:
            train(model, opt, steps=1)
            sched.step()
            ck.save(step=1, model=model, optimizer=opt, extra={"scheduler": sched})
        fresh, fresh_opt = build(kind, seed=1)
        fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=1, gamma=0.5)
        with ckptkit.CheckpointManager.from_config(cfg) as ck:
            try:
                ck.restore(fresh, fresh_opt, extra={"scheduler": fresh_sched} if rank == 0 else None)
                result["raised"] = None
            except ckptkit.CkptkitError as exc:
                result["raised"] = [type(exc).__name__, str(exc)]
            result["restored"] = ck.restore(fresh, fresh_opt, extra={"scheduler": fresh_sched}).step
        result["epoch"] = fresh_sched.last_epoch

    elif scenario == "rank_leaves_during_shard_load":
        # Rank 1 is gone (crashed, killed) just as DCP's load of the shards starts: rank 0 must
        # say so, not call the checkpoint incompatible.
        saved_after_one_step(cfg, kind)
        path = os.path.join(workdir, f"result-{scenario}-{rank}.json")
        if rank == 1:
            def gone(*args, **kwargs):
                with open(path, "w") as f:
                    json.dump(result, f)
                os._exit(0)

            sharded.load = gone
        model2, opt2 = build(kind, seed=1)
        ck = ckptkit.CheckpointManager.from_config(cfg)
        result["raised"] = restore_raised(ck, model2, opt2)
        ck.list_checkpoints()  # no collective: still fine
        result["later"] = restore_raised(ck, model2, opt2)
        with open(path, "w") as f:
            json.dump(result, f)
        os._exit(0)  # no peer left for the barrier at the end

    elif scenario == "restore_meta":
        # A resuming process that builds its model on the meta device: DCP takes the tensors it
        # is given there (assign=True), so the state file must not be loaded through a mapping.
        ck = ckptkit.CheckpointManager.from_config(cfg)
        torch.manual_seed(0)
        saved = torch.nn.Linear(256, 256)
        ck.save(step=1, model=saved)
        ck.wait()
        fresh = torch.nn.Linear(256, 256, device="meta")
        ck.restore(model=fresh)
        result["equal"] = all(torch.equal(a.detach(), b.detach()) for a, b in zip(fresh.parameters(), saved.parameters()))
        result["mapped"] = mapped_under(workdir)
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

    elif scenario == "restore_step":
        # Steps 0-3 saved; step 1 restored into a fresh model on every rank. Then, on every rank
        # alike: the next save is refused (steps 2 and 3 remain), and a step never saved is not found.
        ck = ckptkit.CheckpointManager.from_config(cfg)
        model, opt = build(kind, seed=0)
        train(model, opt, steps=2, ck=ck)
        expected = snapshot(model, opt)
        train(model, opt, steps=2, ck=ck, start=2)
        ck.close()
        ck = ckptkit.CheckpointManager.from_config(cfg)
        model, opt = build(kind, seed=7)
        result["restored_step"] = ck.restore(model=model, optimizer=opt, step=1).step
        result["diffs"] = same(expected, snapshot(model, opt))
        for name, call in (("save", lambda: ck.save(step=2, model=model, optimizer=opt)),
                           ("missing", lambda: ck.restore(model=model, optimizer=opt, step=9))):
            try:
                call()
                result[name] = None
            except ckptkit.CkptkitError as exc:
                result[name] = f"{type(exc).__name__}: {exc}"
        ck.close()

    elif scenario == "matrix":
        # Every wrapping, format and optimizer: save at step SAVED_AT and go on uninterrupted,
        # then restore into a fresh model and go on again: the same losses and weights.
        for name in matrix_names(opts.get("wraps", ("ddp", "fsdp2"))):
            cfg_n, model, opt, sched = matrix_parts(name, cfg, seed=0)
            ck = matrix_manager(cfg_n)
            matrix_train(model, opt, sched, range(SAVED_AT))
            ck.save(step=SAVED_AT, model=model, optimizer=opt, extra={"sched": sched})
            ck.close()
            at_save = full_state(model, opt)
            losses = matrix_train(model, opt, sched, range(SAVED_AT, SAVED_AT + 3))
            final = full_state(model, opt)
            if rank == 0:
                torch.save({"at_save": at_save, "final": final}, os.path.join(workdir, f"ref-{name}.pt"))
            report, (_, model, opt, sched, ref) = matrix_restore(name, cfg, workdir)
            report["losses_equal"] = matrix_train(model, opt, sched, range(SAVED_AT, SAVED_AT + 3)) == losses
            state = full_state(model, opt)
            if rank == 0:
                report["final_diffs"] = differences(ref["final"], state)
            result[name] = report

    elif scenario == "matrix_restore":
        # What "matrix" saved, restored on another world size: the same state, and it trains.
        # One rank saves it again, for a plain process to load.
        for name in MATRIX:
            report, (cfg_n, model, opt, sched, _) = matrix_restore(name, cfg, workdir)
            if ranks.world_size() == 1:
                cfg_n["run_name"] = f"{name}-resaved"
                ck = matrix_manager(cfg_n)
                ck.save(step=SAVED_AT, model=model, optimizer=opt, extra={"sched": sched})
                ck.close()
            report["trained"] = all(map(math.isfinite, matrix_train(model, opt, sched, range(SAVED_AT, SAVED_AT + 1))))
            result[name] = report

    elif scenario == "rank0_fails":
        ck = ckptkit.CheckpointManager.from_config(cfg)
        model, opt = build(kind, seed=0)
        train(model, opt, steps=1)
        # State that restore could not load is refused before writing, on every rank.
        try:
            ck.save(step=1, model=model, optimizer=opt, force=True, extra={"bad": (lambda: None) if rank == 0 else 0})
            result["refused"] = None
        except ckptkit.UnstorableStateError as exc:
            result["refused"] = str(exc)
        try:
            # Allowed by the trainer, the lambda passes the check; only rank 0 serialises in full
            # mode, and pickling it fails its save half-way.
            ck.save(step=1, model=model, optimizer=opt, force=True,
                    extra={"bad": (lambda: None) if rank == 0 else 0}, safe_globals=[types.FunctionType])
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
    # Leave without the interpreter's finalization: gloo's threads may free a finished
    # collective's tensors after it began, which aborts the rank (SIGABRT, 'terminate called
    # without an active exception'; pytorch/pytorch#190489). The results are written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
