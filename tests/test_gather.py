"""The gatherer in one process: every optimizer and wrapping resumes bit for bit.

A process group of one rank (gloo on an in-memory store) stands in for ``torchrun
--nproc-per-node 1``: there FSDP2 still holds DTensors and DDP still wraps the module, so
the state must go through the same gather and scatter as on many ranks.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

import ckptkit
from ckptkit import gather
from ckpt_helpers import assert_same_state, local_config

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=0.1),
    # A group without parameters before the others: DCP loads it without its settings.
    "adamw_empty_group_first": lambda params: torch.optim.AdamW(
        [{"params": [], "lr": 0.5, "betas": (0.5, 0.6)}, {"params": list(params)}], lr=1e-2),
}


class _UnusedHead(torch.nn.Sequential):
    """Layers run in order but for the last one, a head that no step uses: its parameters never
    get a gradient, so the optimizer never holds state for them."""

    def forward(self, x):
        for layer in list(self)[:-1]:
            x = layer(x)
        return x


def build(wrap: str, optimizer: str, seed: int, unused: bool = False, tied: bool = False):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)]
    if tied:  # two layers sharing one weight: one parameter under two names
        layers[2:2] = [torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32)]
        layers[4].weight = layers[2].weight
    model = _UnusedHead(*layers, torch.nn.Linear(4, 4)) if unused else torch.nn.Sequential(*layers)
    if wrap == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=unused)
    elif wrap == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (1,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = OPTIMIZERS[optimizer](model.parameters())
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def train(model, opt, sched, steps: range) -> list[float]:
    losses = []
    for step in steps:
        torch.manual_seed(100 + step)  # the data of a step does not depend on what ran before
        loss = model(torch.randn(8, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def full_state(model, opt) -> dict:
    """A copy of model and optimizer state keyed by parameter name, the same for every wrapping."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True) if gather.distributed(model) else None
    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    return copy.deepcopy({"model": model_sd, "optimizer": optim_sd})


def resume_matches_uninterrupted(tmp_path, fmt: str, optimizer: str, saved_as: str, restored_as: str,
                                 unused: bool = False, tied: bool = False) -> None:
    """Save after 3 steps, go on for 3; a fresh model restored from the save goes on the same way."""
    cfg = local_config(tmp_path, every=3)
    cfg["roles"]["resume"]["format"] = fmt
    model, opt, sched = build(saved_as, optimizer, seed=0, unused=unused, tied=tied)
    ck = ckptkit.CheckpointManager.from_config(cfg)
    train(model, opt, sched, range(3))
    ck.save(step=3, model=model, optimizer=opt, extra={"sched": sched})
    ck.close()
    at_save = full_state(model, opt)
    expected_losses = train(model, opt, sched, range(3, 6))
    expected = full_state(model, opt)

    model2, opt2, sched2 = build(restored_as, optimizer, seed=1, unused=unused, tied=tied)
    ck = ckptkit.CheckpointManager.from_config(cfg)
    restored = ck.restore(model=model2, optimizer=opt2, extra={"sched": sched2})
    ck.close()
    assert restored.step == 3
    assert_same_state(full_state(model2, opt2), at_save)
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["initial_lr"] * 0.5
    assert train(model2, opt2, sched2, range(3, 6)) == expected_losses
    assert_same_state(full_state(model2, opt2), expected)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_every_optimizer_and_scheduler_resume_bit_identical(tmp_path, fmt, optimizer):
    resume_matches_uninterrupted(tmp_path, fmt, optimizer, "plain", "plain")


@pytest.fixture
def group_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("fmt", ["torch", "dcp"])
@pytest.mark.parametrize("saved_as, restored_as",
                         [("fsdp2", "fsdp2"), ("plain", "fsdp2"), ("fsdp2", "plain"), ("ddp", "ddp"), ("ddp", "plain")])
def test_one_rank_wrappings_resume_bit_identical(tmp_path, group_of_one, fmt, optimizer, saved_as, restored_as):
    """Full state saved by one wrapping (what N ranks write in format: torch) fills any other."""
    resume_matches_uninterrupted(tmp_path, fmt, optimizer, saved_as, restored_as)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd_momentum"])
@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_a_parameter_that_never_got_a_gradient_resumes_without_optimizer_state(tmp_path, fmt, optimizer):
    """An unused head has no optimizer state, which torch's load_state_dict accepts and DCP's
    strict default refused: the checkpoint could not be restored at all."""
    resume_matches_uninterrupted(tmp_path, fmt, optimizer, "plain", "plain", unused=True)


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_a_parameter_that_never_got_a_gradient_resumes_wrapped(tmp_path, group_of_one, fmt, wrap):
    """Gathered and broadcast, or sharded: the head still has no optimizer state after restore
    (DCP's own zero state, made by a step at lr=0, would give AdamW's counter a head start)."""
    resume_matches_uninterrupted(tmp_path, fmt, "adamw", wrap, wrap, unused=True)


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
@pytest.mark.parametrize("wrap", ["plain", "ddp"])
def test_a_tied_weight_keeps_its_optimizer_state(tmp_path, group_of_one, fmt, wrap):
    """A weight under two names has its state saved under one: it is held, whichever name
    restore meets first."""
    resume_matches_uninterrupted(tmp_path, fmt, "adamw", wrap, wrap, unused=True, tied=True)


def _layouts():
    def head_only(model):
        return torch.optim.AdamW(model[2].parameters(), lr=1e-2)

    def all_params(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-2)

    def one_group(model):
        return torch.optim.AdamW(model[0].parameters(), lr=1e-2)

    def two_groups(model):
        return torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 5e-3}],
                                 lr=1e-2)

    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def adam(model):
        return torch.optim.Adam(model.parameters(), lr=1e-2)

    return {
        "head only, restored over all": (head_only, all_params, "no parameter named 0.bias, 0.weight"),
        "one group, restored in two": (one_group, two_groups, "1 param group"),
        "two groups, restored in one": (two_groups, all_params, "2 param group"),
        "sgd, restored into adamw": (sgd, all_params, ("holds the state of a torch.optim.sgd.SGD optimizer, and the "
                                                       "optimizer given to restore is a torch.optim.adamw.AdamW")),
        # torch's own load_state_dict takes these: SGD given Adam's groups fails its first step
        # (no momentum setting), AdamW given Adam's trains as Adam.
        "adam, restored into sgd": (adam, sgd, ("a torch.optim.adam.Adam optimizer, and the optimizer given to "
                                                "restore is a torch.optim.sgd.SGD")),
        "adam, restored into adamw": (adam, all_params, ("a torch.optim.adam.Adam optimizer, and the optimizer "
                                                         "given to restore is a torch.optim.adamw.AdamW")),
    }


@pytest.mark.parametrize("layout", sorted(_layouts()))
@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_an_optimizer_built_otherwise_than_the_saved_one_is_refused_at_once(tmp_path, fmt, layout):
    """Not strict about state (a parameter may have none) is not loose about layout: a group
    the checkpoint has no settings for would fail the first step (no betas), and parameters it
    never saw would train from no state. Refused before the model is loaded, and without
    falling back to an older checkpoint."""
    refused_at_once(tmp_path, fmt, layout, "plain")


@pytest.mark.parametrize("layout", ["head only, restored over all", "two groups, restored in one"])
def test_an_optimizer_built_otherwise_is_refused_where_full_state_is_broadcast(tmp_path, group_of_one, layout):
    """Gathered to rank 0 and broadcast: rank 0 finds the misfit, and every rank raises it."""
    refused_at_once(tmp_path, "torch", layout, "ddp")


def refused_at_once(tmp_path, fmt: str, layout: str, wrap: str) -> None:
    saved_as, restored_as, match = _layouts()[layout]
    cfg = local_config(tmp_path, every=1)
    cfg["roles"]["resume"]["format"] = fmt
    model, _, _ = build(wrap, "sgd", seed=0)
    opt = saved_as(getattr(model, "module", model))
    ck = ckptkit.CheckpointManager.from_config(cfg)
    for step in range(2):
        train(model, opt, torch.optim.lr_scheduler.StepLR(opt, 1), range(step, step + 1))
        ck.save(step=step, model=model, optimizer=opt)
    ck.close()
    model2, _, _ = build(wrap, "sgd", seed=1)
    opt2 = restored_as(getattr(model2, "module", model2))
    before = copy.deepcopy(model2.state_dict())
    ck = ckptkit.CheckpointManager.from_config(cfg)
    with pytest.raises(ckptkit.IncompatibleCheckpointError, match=match) as info:
        ck.restore(model=model2, optimizer=opt2)
    ck.close()
    assert "step-0000000001" in str(info.value) and "Build the optimizer as the run that saved it did" in str(info.value)
    assert len(opt2.state) == 0
    assert_same_state(model2.state_dict(), before)


def _saved_with_a_head_then_stepped_without_it(tmp_path, fmt, wrap):
    """A checkpoint whose optimizer holds state for every layer, and an optimizer that has
    stepped since with the last layer getting no gradient (a rollback in the same process)."""
    cfg = local_config(tmp_path, every=1)
    cfg["roles"]["resume"]["format"] = fmt
    model, opt, sched = build(wrap, "adamw", seed=0)
    train(model, opt, sched, range(2))
    ck = ckptkit.CheckpointManager.from_config(cfg)
    ck.save(step=2, model=model, optimizer=opt)
    ck.close()
    at_save = full_state(model, opt)
    model2, opt2, _ = build(wrap, "adamw", seed=1)
    inner = getattr(model2, "module", model2)
    for p in inner[0].parameters():  # a step in which the other layers get no gradient
        p.grad = torch.ones_like(p)
    opt2.step()
    opt2.zero_grad()
    assert 0 < len(opt2.state) < len(list(model2.parameters()))
    return cfg, at_save, model2, opt2


@pytest.mark.parametrize("fmt, wrap", [("dcp", "plain"), ("torch", "ddp"), ("dcp", "ddp")])
def test_a_stepped_optimizer_lacking_state_the_checkpoint_holds_is_refused_not_left_without_it(
        tmp_path, group_of_one, fmt, wrap):
    """Loaded in place (sharded) or broadcast (full), only the state an optimizer holds already
    is filled in: the saved state of a parameter that has none yet would be lost (or reach
    rank 0 alone). Refused before anything is loaded."""
    cfg, _, model2, opt2 = _saved_with_a_head_then_stepped_without_it(tmp_path, fmt, wrap)
    before_model, before_opt = copy.deepcopy(full_state(model2, opt2)), len(opt2.state)
    ck = ckptkit.CheckpointManager.from_config(cfg)
    with pytest.raises(ckptkit.IncompatibleCheckpointError, match="stepped without, so loading would lose it"):
        ck.restore(model=model2, optimizer=opt2)
    ck.close()
    assert len(opt2.state) == before_opt
    assert_same_state(full_state(model2, opt2), before_model)


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_a_stepped_optimizer_over_part_of_the_model_restores(tmp_path, fmt):
    """Fine-tuning a part from a checkpoint whose optimizer trained the whole model: the saved
    state of the parameters it does not train is not lacking from it."""
    cfg = local_config(tmp_path, every=1)
    cfg["roles"]["resume"]["format"] = fmt
    model, opt, sched = build("plain", "adamw", seed=0)
    train(model, opt, sched, range(2))
    ck = ckptkit.CheckpointManager.from_config(cfg)
    ck.save(step=2, model=model, optimizer=opt)
    ck.close()
    at_save = full_state(model, opt)
    model2, _, _ = build("plain", "adamw", seed=1)
    model2[2].requires_grad_(False)
    part = torch.optim.AdamW(model2[0].parameters(), lr=1e-2)
    train(model2, part, torch.optim.lr_scheduler.StepLR(part, 1), range(1))
    assert len(part.state) == 2
    ck = ckptkit.CheckpointManager.from_config(cfg)
    assert ck.restore(model=model2, optimizer=part).step == 2
    ck.close()
    restored = full_state(model2, part)
    assert_same_state(restored["model"], at_save["model"])
    assert_same_state(restored["optimizer"]["state"],
                      {k: v for k, v in at_save["optimizer"]["state"].items() if k.startswith("0.")})


def test_a_stepped_plain_optimizer_takes_all_the_saved_state(tmp_path):
    """A plain model's optimizer is replaced whole by torch's own load_state_dict."""
    cfg, at_save, model2, opt2 = _saved_with_a_head_then_stepped_without_it(tmp_path, "torch", "plain")
    ck = ckptkit.CheckpointManager.from_config(cfg)
    assert ck.restore(model=model2, optimizer=opt2).step == 2
    ck.close()
    assert_same_state(full_state(model2, opt2), at_save)


def test_two_param_groups_without_parameters_are_refused_with_the_reason(tmp_path):
    """DCP loads at most one group without parameters: save refuses such an optimizer before it
    writes anything, and restore refuses to load into one."""
    def groups(model, *parts):
        return torch.optim.AdamW([{"params": [p for i in part for p in model[i].parameters()]} for part in parts],
                                 lr=1e-2)

    cfg = local_config(tmp_path, every=1)
    model, _, _ = build("plain", "sgd", seed=0)
    ck = ckptkit.CheckpointManager.from_config(cfg)
    with pytest.raises(ckptkit.UnstorableStateError, match="2 param groups without parameters"):
        ck.save(step=1, model=model, optimizer=groups(model, [], [0, 2], []))
    assert ck.list_checkpoints() == []
    ck.save(step=1, model=model, optimizer=groups(model, [], [0], [2]))
    ck.close()
    model2, _, _ = build("plain", "sgd", seed=1)
    ck = ckptkit.CheckpointManager.from_config(cfg)
    with pytest.raises(ckptkit.IncompatibleCheckpointError, match="2 param groups without parameters.*loads at most one"):
        ck.restore(model=model2, optimizer=groups(model2, [], [0, 2], []))
    ck.close()


def test_a_model_that_fails_to_load_leaves_an_unstepped_optimizer_empty(tmp_path):
    """The optimizer loads first; when the model then fails (the same names, another shape),
    the optimizer is put back as it was, without the state it took or the mark of it."""
    cfg = local_config(tmp_path, every=1)
    model, opt, sched = build("plain", "adamw", seed=0)
    train(model, opt, sched, range(1))
    ck = ckptkit.CheckpointManager.from_config(cfg)
    ck.save(step=1, model=model, optimizer=opt)
    ck.close()
    torch.manual_seed(1)
    wider = torch.nn.Sequential(torch.nn.Linear(16, 48), torch.nn.ReLU(), torch.nn.Linear(48, 4))
    opt2 = torch.optim.AdamW(wider.parameters(), lr=1e-2)
    ck = ckptkit.CheckpointManager.from_config(cfg)
    with pytest.raises(ckptkit.IncompatibleCheckpointError, match=r"step-0*1: the model given to restore does not fit the "
                                                          r"weights saved there \(0.bias is \(32,\) there and \(48,\) in the model, .*new run name"):
        ck.restore(model=wider, optimizer=opt2)
    ck.close()
    assert len(opt2.state) == 0 and opt2.param_groups[0]["lr"] == 1e-2


def test_a_model_with_other_layers_is_refused_as_incompatible_not_skipped(tmp_path):
    """Keys the model lacks or does not know (layers made after restore, a renamed head) are the
    model's misfit, not damage: raised at once, naming the checkpoint, with no older step tried."""
    cfg = local_config(tmp_path, every=1)
    model, opt, sched = build("plain", "adamw", seed=0)
    ck = ckptkit.CheckpointManager.from_config(cfg)
    for step in (1, 2):
        train(model, opt, sched, range(step - 1, step))
        ck.save(step=step, model=model, optimizer=opt)
    ck.close()
    other = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU())
    ck = ckptkit.CheckpointManager.from_config(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipped step 2" warning: nothing older is tried
        with pytest.raises(ckptkit.IncompatibleCheckpointError, match=r"step-0*2: .*weights the model lacks: 2\.bias, "
                                                              r"2\.weight\)"):
            ck.restore(model=other)
    ck.close()


def test_lbfgs_resumes_bit_identical(tmp_path):
    """LBFGS keeps all its state under its first parameter, none under the others."""
    def run(model, opt, steps):
        losses = []
        for step in steps:
            torch.manual_seed(100 + step)
            x = torch.randn(8, 16)

            def closure():
                opt.zero_grad()
                loss = model(x).pow(2).mean()
                loss.backward()
                return loss

            losses.append(opt.step(closure).item())
        return losses

    def fresh(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
        return model, torch.optim.LBFGS(model.parameters(), lr=0.5, history_size=3, max_iter=4)

    model, opt = fresh(0)
    run(model, opt, range(3))
    ck = ckptkit.CheckpointManager.from_config(local_config(tmp_path))
    ck.save(step=3, model=model, optimizer=opt)
    ck.close()
    at_save = full_state(model, opt)
    assert len(opt.state) == 1 and len(opt.state[next(model.parameters())]["old_dirs"]) == 3
    expected = run(model, opt, range(3, 6))

    model2, opt2 = fresh(1)
    ck = ckptkit.CheckpointManager.from_config(local_config(tmp_path))
    assert ck.restore(model=model2, optimizer=opt2).step == 3
    ck.close()
    assert_same_state(full_state(model2, opt2), at_save)
    assert run(model2, opt2, range(3, 6)) == expected
    assert_same_state(full_state(model2, opt2), full_state(model, opt))


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
@pytest.mark.parametrize("wrap", ["plain", "ddp"])
def test_a_frozen_layer_keeps_its_optimizer_state_for_when_it_is_unfrozen(tmp_path, group_of_one, fmt, wrap):
    """Adam keeps the moments of a layer frozen part way; DCP loads state only into parameters
    that require a gradient. Restored into the same frozen model, the moments come back, and
    the training after unfreezing goes on bit for bit."""
    def built(seed):
        model, opt, sched = build("plain", "adamw", seed=seed)
        # DDP takes a layer frozen part way only when it looks for unused parameters.
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if wrap == "ddp" else model
        return wrapped, opt, sched

    cfg = local_config(tmp_path, every=1)
    cfg["roles"]["resume"]["format"] = fmt
    model, opt, sched = built(0)
    train(model, opt, sched, range(2))
    inner = getattr(model, "module", model)
    inner[0].requires_grad_(False)
    train(model, opt, sched, range(2, 4))
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        ck.save(step=4, model=model, optimizer=opt)
    at_save = full_state(model, opt)
    assert len(opt.state) == 4
    inner[0].requires_grad_(True)
    expected = train(model, opt, sched, range(4, 6))

    model2, opt2, sched2 = built(1)
    inner2 = getattr(model2, "module", model2)
    inner2[0].requires_grad_(False)
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        assert ck.restore(model=model2, optimizer=opt2).step == 4
    assert len(opt2.state) == 4 and not inner2[0].weight.requires_grad and inner2[2].weight.requires_grad
    assert_same_state(full_state(model2, opt2), at_save)
    inner2[0].requires_grad_(True)
    sched2.load_state_dict(sched.state_dict())  # not what is under test: the scheduler is not saved here
    assert train(model2, opt2, sched2, range(4, 6)) == expected


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_an_unstepped_optimizer_over_flat_parameters_saves_and_restores(tmp_path, group_of_one, fmt):
    """FSDP1 with use_orig_params wants the state of all of a flat parameter's parameters or of
    none: the save at step 0 hands DCP an empty entry for each."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    def built(seed):
        torch.manual_seed(seed)
        model = FullyShardedDataParallel(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)),
                                         device_id=torch.device("cpu"), use_orig_params=True)
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    cfg = local_config(tmp_path)
    cfg["roles"]["resume"]["format"] = fmt
    model, opt = built(0)
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        ck.save(step=0, model=model, optimizer=opt)
    assert len(opt.state) == 0
    model2, opt2 = built(1)
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        assert ck.restore(model=model2, optimizer=opt2).step == 0
    assert len(opt2.state) == 0
    assert_same_state(full_state(model2, opt2), full_state(model, opt))


def test_lbfgs_in_a_distributed_model_is_refused_at_save(tmp_path, group_of_one):
    """Broadcast from rank 0, a restore would have DCP make LBFGS's state by a step without a
    closure: refused at save, in format torch too, with nothing written."""
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    lbfgs = torch.optim.LBFGS(model.parameters())
    with ckptkit.CheckpointManager.from_config(local_config(tmp_path)) as ck:
        with pytest.raises(ckptkit.UnstorableStateError, match="LBFGS, whose step.. needs a closure, cannot be "
                           "restored into a distributed model"):
            ck.save(step=0, model=model, optimizer=lbfgs)
        assert ck.list_checkpoints() == []
        with pytest.raises(ckptkit.CheckpointNotFoundError):
            ck.restore(model=model, optimizer=lbfgs, step=0)


def test_a_frozen_integer_parameter_is_left_frozen_and_restores(tmp_path):
    """Only floating-point tensors can require a gradient: an int8 base weight the optimizer
    holds (as in QLoRA) stays as it is while the frozen float layers are made trainable."""
    def built(seed):
        model, opt, sched = build("plain", "adamw", seed=seed)
        model.register_parameter("quantized", torch.nn.Parameter(torch.arange(6, dtype=torch.int8),
                                                                  requires_grad=False))
        opt.add_param_group({"params": [model.quantized]})
        return model, opt, sched

    model, opt, sched = built(0)
    train(model, opt, sched, range(2))
    with ckptkit.CheckpointManager.from_config(local_config(tmp_path)) as ck:
        ck.save(step=2, model=model, optimizer=opt)
    model2, opt2, _ = built(1)
    model2[0].requires_grad_(False)
    with ckptkit.CheckpointManager.from_config(local_config(tmp_path)) as ck:
        assert ck.restore(model=model2, optimizer=opt2).step == 2
    assert not model2.quantized.requires_grad and not model2[0].weight.requires_grad
    assert_same_state(full_state(model2, opt2), full_state(model, opt))


def test_a_restore_makes_no_place_for_state_of_a_frozen_layer_the_checkpoint_holds_none_for(tmp_path):
    """DCP makes a new optimizer's state by a step for every parameter that requires a gradient:
    a frozen layer without saved state stays frozen through it (a frozen backbone's moments
    would be made for nothing)."""
    cfg = local_config(tmp_path)
    cfg["roles"]["resume"]["format"] = "dcp"
    model, opt, sched = build("plain", "adamw", seed=0)
    model[0].requires_grad_(False)
    train(model, opt, sched, range(2))
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        ck.save(step=2, model=model, optimizer=opt)
    model2, opt2, _ = build("plain", "adamw", seed=1)
    model2[0].requires_grad_(False)
    trainable_at_steps = []
    opt2.register_step_pre_hook(lambda *args: trainable_at_steps.append(
        sorted(n for n, p in model2.named_parameters() if p.requires_grad)))
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        assert ck.restore(model=model2, optimizer=opt2).step == 2
    assert trainable_at_steps and all(t == ["2.bias", "2.weight"] for t in trainable_at_steps)
    assert_same_state(full_state(model2, opt2), full_state(model, opt))


def test_the_class_of_the_state_is_the_torch_optim_class_inside_wrappers_and_subclasses():
    params = [torch.nn.Parameter(torch.zeros(2))]

    class MyAdamW(torch.optim.AdamW):
        pass

    class Custom(torch.optim.Optimizer):
        pass

    class Wrapping:  # holds the optimizer it wraps as accelerate's AcceleratedOptimizer does
        def __init__(self, optimizer):
            self.optimizer = optimizer

    adamw = gather.optimizer_class(torch.optim.AdamW(params))
    assert adamw == "torch.optim.adamw:AdamW" == gather.optimizer_class(MyAdamW(params))
    assert gather.optimizer_class(Wrapping(MyAdamW(params))) == adamw
    wrapped_adam = gather.optimizer_class(Wrapping(torch.optim.Adam(params)))
    assert wrapped_adam == "torch.optim.adam:Adam" and not gather.same_class(wrapped_adam, adamw)
    assert gather.same_class("torch.optim.moved_elsewhere:AdamW", adamw)
    custom = gather.optimizer_class(Custom(params, {}))
    assert custom.endswith(":test_the_class_of_the_state_is_the_torch_optim_class_inside_wrappers_and_subclasses."
                           "<locals>.Custom")
    assert not gather.same_class("bitsandbytes.optim.adamw:AdamW", adamw)
    assert gather.needs_closure(Wrapping(torch.optim.LBFGS(params))) and not gather.needs_closure(Wrapping(
        torch.optim.AdamW(params)))


def test_an_unstepped_lbfgs_saved_at_step_0_restores_and_trains_on(tmp_path):
    """DCP would make an unstepped optimizer's state by a step without a closure, which LBFGS
    refuses: the save at step 0 of a new training names the groups without any step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, history_size=3, max_iter=4)
    with ckptkit.CheckpointManager.from_config(local_config(tmp_path)) as ck:
        ck.save(step=0, model=model, optimizer=opt)
    assert len(opt.state) == 0
    model2 = torch.nn.Linear(16, 4)
    opt2 = torch.optim.LBFGS(model2.parameters(), lr=0.5, history_size=3, max_iter=4)
    with ckptkit.CheckpointManager.from_config(local_config(tmp_path)) as ck:
        assert ck.restore(model=model2, optimizer=opt2).step == 0
    assert len(opt2.state) == 0 and opt2.param_groups[0]["history_size"] == 3
    assert_same_state(model2.state_dict(), model.state_dict())


@pytest.mark.parametrize("wrap", ["plain", "ddp"])
def test_saving_an_unstepped_optimizer_runs_none_of_its_step_hooks(tmp_path, group_of_one, wrap):
    """A step hook may be training's own (an EMA update, a step counter): the save at step 0
    must not step the optimizer, even at lr=0, nor make state for it."""
    model, opt, _ = build(wrap, "adamw", seed=0)
    steps = []
    opt.register_step_pre_hook(lambda *args: steps.append("pre"))
    opt.register_step_post_hook(lambda *args: steps.append("post"))
    with ckptkit.CheckpointManager.from_config(local_config(tmp_path)) as ck:
        ck.save(step=0, model=model, optimizer=opt)
    assert steps == [] and len(opt.state) == 0
    assert all(p.grad is None for p in model.parameters())


def test_plain_replica_in_a_group_of_one_is_not_gathered(group_of_one):
    model, opt, _ = build("plain", "sgd", seed=0)
    assert not gather.distributed(model)
    assert gather.distributed(build("ddp", "sgd", seed=0)[0])
    assert gather.distributed(build("fsdp2", "sgd", seed=0)[0])


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_restoring_into_an_unstepped_optimizer_takes_no_step(tmp_path, optimizer):
    """DCP would give an empty optimizer zero state through a step at lr=0 (AdamW: twice the
    model's size in fresh memory) before loading over it; restoring a plain module needs none."""
    model, opt, sched = build("plain", optimizer, seed=0)
    train(model, opt, sched, range(2))
    ck = ckptkit.CheckpointManager.from_config(local_config(tmp_path))
    ck.save(step=2, model=model, optimizer=opt)
    model2, opt2, _ = build("plain", optimizer, seed=1)
    steps = []
    opt2.register_step_pre_hook(lambda *_: steps.append(1))
    assert ck.restore(model=model2, optimizer=opt2).step == 2
    assert steps == []
    assert_same_state(full_state(model2, opt2), full_state(model, opt))
    ck.close()


def test_a_failed_optimizer_load_leaves_an_unstepped_optimizer_empty(tmp_path):
    class Refusing(torch.optim.AdamW):
        def load_state_dict(self, state_dict):
            raise RuntimeError("this optimizer refuses the state")

    model, opt, sched = build("plain", "adamw", seed=0)
    train(model, opt, sched, range(2))
    state = gather.resume_state(model, opt)
    model2, _, _ = build("plain", "adamw", seed=1)
    opt2 = Refusing(model2.parameters())
    with pytest.raises(RuntimeError, match="refuses the state"):
        gather.load_resume_state(model2, opt2, state, full=True, coll=ckptkit.ranks.Collectives(60, {}))
    assert len(opt2.state) == 0


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_a_group_without_parameters_keeps_its_settings_through_the_gathered_path(tmp_path, group_of_one, wrap):
    """Full state gathered to rank 0 and broadcast: the group's settings come from rank 0 too."""
    resume_matches_uninterrupted(tmp_path, "torch", "adamw_empty_group_first", wrap, wrap)


def test_a_cast_final_state_keeps_the_module_versions():
    """load_state_dict converts what an older module version saved by ``_metadata``: a final
    model saved in another dtype must carry it as the model's own state dict does."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    sd = model.state_dict()
    cast = gather.cast(sd, "bfloat16")
    assert cast._metadata == sd._metadata and cast._metadata["1"]["version"] == 2
    assert cast["0.weight"].dtype == torch.bfloat16 and cast["1.num_batches_tracked"].dtype == torch.int64


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions")
@pytest.mark.parametrize("make", [
    lambda scale: torch.quantize_per_tensor(torch.arange(8.0) * scale, scale, 0, torch.qint8),
    lambda scale: torch.quantize_per_channel(torch.arange(8.0).reshape(2, 4) * torch.tensor([[scale], [1.0]]),
                                             torch.tensor([scale, 1.0]), torch.tensor([0, 0]), 0, torch.qint8),
], ids=["per_tensor", "per_channel"])
def test_quantized_buffers_that_differ_only_in_scale_are_told_apart(make):
    # Their storage holds the same integers: compared by it alone, ranks with other scales
    # would be taken to agree, and each would resume with rank 0's.
    a, b = make(0.5), make(0.25)
    assert torch.equal(a.int_repr(), b.int_repr())
    assert gather._digest(a) != gather._digest(b)
    assert gather._digest(a) == gather._digest(make(0.5))


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
@pytest.mark.parametrize("stepped", [True, False])
def test_an_optimizer_training_a_parameter_outside_the_model_is_refused_by_name(tmp_path, fmt, stepped):
    """A learned temperature kept beside the model, trained by its optimizer: optimizer state is
    named by the model's parameter names, so it has none; the save says which and what to do,
    instead of DCP's bare KeyError. Registered on the model, it saves and restores."""
    cfg = local_config(tmp_path, every=1, final=False)
    cfg["roles"]["resume"]["format"] = fmt
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    scale = torch.nn.Parameter(torch.ones(()))
    opt = torch.optim.AdamW([*model.parameters(), scale], lr=0.1)
    if stepped:
        (model(torch.randn(3, 4)).sum() * scale).backward()
        opt.step()
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        with pytest.raises(ckptkit.UnstorableStateError,
                           match=r"trains param_groups\[0\]\['params'\]\[2\] \(a scalar torch.float32 tensor\), "
                                 r"which is not a parameter of the model.*register a parameter that belongs elsewhere on the model"):
            ck.save(step=1, model=model, optimizer=opt)
        assert ck.list_checkpoints() == []
        model.logit_scale = scale
        ck.save(step=1, model=model, optimizer=opt)
    again = torch.nn.Linear(4, 2)
    again.logit_scale = torch.nn.Parameter(torch.zeros(()))
    again_opt = torch.optim.AdamW(again.parameters(), lr=0.1)
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        assert ck.restore(model=again, optimizer=again_opt).step == 1
    assert torch.equal(again.logit_scale, scale) and torch.equal(again.weight, model.weight)


class _CountingSGD(torch.optim.SGD):
    """A hand-written optimizer that keeps a count of its own in its state, under no parameter."""

    def step(self, closure=None):
        super().step(closure)
        self.state["global"] = self.state.get("global", 0) + 1


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_optimizer_state_under_a_key_of_its_own_is_refused_by_name(tmp_path, fmt):
    """DCP names optimizer state by parameter: a step count kept under "global" made save fail with
    DCP's bare KeyError: 'global'. The save says which entry and what to do; passed as extra=,
    the optimizer saves and restores whole."""
    cfg = local_config(tmp_path, every=1, final=False)
    cfg["roles"]["resume"]["format"] = fmt
    model = torch.nn.Linear(4, 2)
    opt = _CountingSGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        with pytest.raises(ckptkit.UnstorableStateError,
                           match=r"the _CountingSGD optimizer's state holds 'global' under a key that is none of its "
                                 r"parameters: .*pass the optimizer as extra=\{'optimizer': \.\.\.\} instead of optimizer="):
            ck.save(step=1, model=model, optimizer=opt)
        assert ck.list_checkpoints() == []
        ck.save(step=1, model=model, extra={"optimizer": opt})
    again = torch.nn.Linear(4, 2)
    again_opt = _CountingSGD(again.parameters(), lr=0.1, momentum=0.9)
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        assert ck.restore(model=again, extra={"optimizer": again_opt}).step == 1
    assert again_opt.state["global"] == 1 and torch.equal(again.weight, model.weight)
    assert torch.equal(again_opt.state[again.weight]["momentum_buffer"], opt.state[model.weight]["momentum_buffer"])


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_restore_with_an_optimizer_of_another_copy_of_the_model_says_so(tmp_path, fmt):
    """The model built again after its optimizer was made: restore said the checkpoint's
    optimizer "has no parameter named ?, ?", as if the checkpoint lacked them."""
    cfg = local_config(tmp_path, every=1, final=False)
    cfg["roles"]["resume"]["format"] = fmt
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        ck.save(step=1, model=model, optimizer=opt)
    earlier, rebuilt = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        with pytest.raises(ckptkit.IncompatibleCheckpointError,
                           match=r"trains param_groups\[0\]\['params'\]\[0\] \(a 2x4 torch.float32 tensor\) \(and 1 "
                                 r"more\), which is not a parameter of the model: its state has no name to be restored "
                                 r"under .*Make the optimizer from the model's own parameters"):
            ck.restore(model=rebuilt, optimizer=torch.optim.SGD(earlier.parameters(), lr=0.1))
        assert ck.restore(model=rebuilt, optimizer=torch.optim.SGD(rebuilt.parameters(), lr=0.1)).step == 1
    assert torch.equal(rebuilt.weight, model.weight)


def test_a_cast_keeps_tied_weights_one_tensor(tmp_path):
    """An embedding tied to the output head was cast once per key: the bfloat16 file held it twice,
    no smaller than the float32 one."""
    emb = torch.nn.Embedding(512, 256)
    head = torch.nn.Linear(256, 512, bias=False)
    head.weight = emb.weight
    model = torch.nn.Sequential(emb, head)
    sd = model.state_dict()
    cast = gather.cast(sd, "bfloat16")
    assert cast["0.weight"] is cast["1.weight"] and cast["0.weight"].dtype == torch.bfloat16
    torch.save(sd, tmp_path / "f32.pt")
    torch.save(cast, tmp_path / "bf16.pt")
    assert (tmp_path / "bf16.pt").stat().st_size < 0.6 * (tmp_path / "f32.pt").stat().st_size
    params = gather.cast(model.state_dict(keep_vars=True), "bfloat16")
    assert params["0.weight"] is params["1.weight"]
    # Views of one storage that differ are cast apart.
    parts = gather.cast({"a": emb.weight[:10], "b": emb.weight[10:20]}, "bfloat16")
    assert parts["a"] is not parts["b"] and torch.equal(parts["b"], emb.weight[10:20].detach().bfloat16())


def _grouped(model: torch.nn.Module, groups: list[list[str]], decays=(0.1, 0.0)) -> torch.optim.AdamW:
    params = dict(model.named_parameters())
    return torch.optim.AdamW([{"params": [params[n] for n in names], "weight_decay": wd, "lr": 0.01 / (1 + i)}
                              for i, (names, wd) in enumerate(zip(groups, decays))])


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_a_parameter_moved_to_another_param_group_is_refused_not_trained_with_that_groups_settings(tmp_path, fmt):
    """The groups built again with one bias in the decay group (a no-decay name filter changed):
    DCP gave the group the saved decay group's settings, and the bias trained with lr 0.01 and
    weight decay 0.1 instead of its own 0.005 and 0.0, without a word. Groups in another order,
    each holding one saved group's parameters, still restore exactly."""
    cfg = local_config(tmp_path, every=1, final=False)
    cfg["roles"]["resume"]["format"] = fmt
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    saved = [["0.weight", "1.weight"], ["0.bias", "1.bias"]]
    opt = _grouped(model, saved)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        ck.save(step=1, model=model, optimizer=opt)
    again = copy.deepcopy(model)
    moved = _grouped(again, [["0.weight", "1.weight", "1.bias"], ["0.bias"]])
    before = copy.deepcopy(moved.state_dict())
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        with pytest.raises(ckptkit.IncompatibleCheckpointError,
                           match=r"param group 0 of the optimizer given to restore holds parameters the checkpoint's "
                                 r"optimizer kept in different groups \(0.weight, 1.weight in its group 0; 1.bias in "
                                 r"its group 1\).*Build the optimizer as the run that saved it did"):
            ck.restore(model=again, optimizer=moved)
        assert moved.state_dict() == before  # nothing loaded
        shared = _grouped(again, [["0.weight"], ["1.weight"]])
        with pytest.raises(ckptkit.IncompatibleCheckpointError,
                           match=r"param groups 0 and 1 of the optimizer given to restore both hold parameters of "
                                 r"the checkpoint's group 0 \(1.weight in group 1\)"):
            ck.restore(model=again, optimizer=shared)
        swapped = _grouped(again, saved[::-1], decays=(0.0, 0.1))
        assert ck.restore(model=again, optimizer=swapped).step == 1
    assert [g["weight_decay"] for g in swapped.param_groups] == [0.0, 0.1]
    assert [g["lr"] for g in swapped.param_groups] == [0.005, 0.01]
    assert torch.equal(swapped.state[again[1].bias]["exp_avg"], opt.state[model[1].bias]["exp_avg"])


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_a_renamed_layer_is_told_as_the_models_change_not_the_optimizers(tmp_path, fmt):
    """A layer renamed since the save, restored with optimizer=: the error blamed the optimizer
    and advised restoring without it, which only moved the failure to the model."""
    cfg = local_config(tmp_path, every=1, final=False)
    cfg["roles"]["resume"]["format"] = fmt
    model = torch.nn.ModuleDict({"fc1": torch.nn.Linear(4, 2)})
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        ck.save(step=1, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    renamed = torch.nn.ModuleDict({"proj": torch.nn.Linear(4, 2)})
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        # A full state is checked against the model first; a sharded one (DCP) is the model's own
        # load target, so the optimizer's saved names tell the change there.
        told = (r"no weights for proj.bias, proj.weight; weights the model lacks: fc1.bias, fc1.weight\). Build the "
                r"model as the training that saved it did.*load_state_dict\(strict=False\)" if fmt == "torch" else
                r"its model has no parameter named proj.bias, proj.weight, which the model given to restore has "
                r"\(a layer renamed or added since the save\?\). Build the model as the run that saved it did")
        with pytest.raises(ckptkit.IncompatibleCheckpointError, match=told):
            ck.restore(model=renamed, optimizer=torch.optim.SGD(renamed.parameters(), lr=0.1))
        # An optimizer over a parameter the saved model had, which the saved optimizer did not train.
        two = torch.nn.ModuleDict({"fc1": torch.nn.Linear(4, 2)})
        with ckptkit.CheckpointManager.from_config(cfg) as ck2:
            ck2.save(step=2, model=two, optimizer=torch.optim.SGD([two["fc1"].weight], lr=0.1))
        with pytest.raises(ckptkit.IncompatibleCheckpointError, match=r"its optimizer has no parameter named fc1.bias"):
            ck.restore(model=two, optimizer=torch.optim.SGD(two.parameters(), lr=0.1))


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_restoring_into_a_model_of_another_dtype_warns_naming_the_parameters(tmp_path, fmt):
    """A float32 training resumed into a model built in bfloat16 by mistake: the weights and
    Adam's moments were rounded on load without a word, and the run went on from there."""
    cfg = local_config(tmp_path, every=1, final=False)
    cfg["roles"]["resume"]["format"] = fmt
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        ck.save(step=1, model=model, optimizer=torch.optim.AdamW(model.parameters()))
    half = copy.deepcopy(model).to(torch.bfloat16)
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        # Refused for its optimizer: nothing was loaded, so nothing was converted either.
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*another dtype.*")
            with pytest.raises(ckptkit.IncompatibleCheckpointError, match="its optimizer has 1 param group"):
                ck.restore(model=half, optimizer=_grouped(half, [["0.weight", "1.weight", "0.bias"], ["1.bias"]]))
        with pytest.warns(RuntimeWarning, match=r"holds 4 parameter\(s\) in another dtype than saved.*0.bias \(saved "
                                                r"float32, the model's bfloat16\), 0.weight .*Build the model in the "
                                                r"dtype it was trained in") as caught:
            assert ck.restore(model=half, optimizer=torch.optim.AdamW(half.parameters())).step == 1
        assert [w.filename for w in caught if "another dtype" in str(w.message)] == [__file__]  # the caller's line
        same = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*another dtype.*")
            assert ck.restore(model=same, optimizer=torch.optim.AdamW(same.parameters())).step == 1


class _Net(torch.nn.Module):
    """Two layers and a norm; the variants below differ from it the ways a changed model does."""

    def __init__(self, hidden=8, norm=True, counter=False, view_weight=False):
        super().__init__()
        self.a = torch.nn.Linear(4, 8)
        self.b = torch.nn.Linear(8, hidden)
        if norm:
            self.bn = torch.nn.BatchNorm1d(hidden)
        if counter:
            self.register_buffer("seen", torch.zeros(()))


@pytest.mark.parametrize("with_optimizer", [False, True])
@pytest.mark.parametrize("changed", ["buffer added", "layer resized", "layer removed", "nothing saved"])
def test_a_model_that_does_not_fit_is_refused_before_any_of_it_is_loaded(tmp_path, changed, with_optimizer):
    """torch's own load_state_dict copies every weight that fits before it raises: a trainer that
    caught the refusal and started afresh trained a model part restored. A checkpoint of a model
    without state (nothing saved) was loaded into any model without a word."""
    cfg = local_config(tmp_path, every=1, final=False)
    torch.manual_seed(0)
    saved = torch.nn.ReLU() if changed == "nothing saved" else _Net()
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        ck.save(step=1, model=saved,
                optimizer=torch.optim.AdamW(saved.parameters()) if with_optimizer and changed != "nothing saved" else None)
    torch.manual_seed(1)
    kwargs = {"buffer added": {"counter": True}, "layer resized": {"hidden": 16}, "layer removed": {"norm": False},
              "nothing saved": {}}[changed]
    model = _Net(**kwargs)
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=0.5) if with_optimizer else None
    told = {"buffer added": r"no weights for seen\)", "layer resized": r"b.bias is \(8,\) there and \(16,\) in the model",
            "layer removed": r"weights the model lacks: bn.bias, bn.num_batches_tracked, bn.running_mean",
            "nothing saved": r"no weights for a.bias, a.weight, b.bias, b.weight, bn.bias and 3 more\)"}[changed]
    told = r"step-0*1: the model given to restore does not fit the weights saved there \(" + told
    if changed == "nothing saved" and opt is not None:
        told = r"step-0*1 holds no optimizer state"  # (a model without parameters has no optimizer)
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        with pytest.raises(ckptkit.IncompatibleCheckpointError, match=told):
            ck.restore(model=model, **({"optimizer": opt} if opt is not None else {}))
    assert_same_state(model.state_dict(), before)
    if opt is not None:
        assert not opt.state and opt.param_groups[0]["lr"] == 0.5


def test_a_model_whose_loading_is_its_own_is_left_to_it(tmp_path):
    """A module that reshapes what it loads (its own _load_from_state_dict) is not judged by the
    names and shapes torch's default load wants: it loads what the plain check would refuse."""
    class Transposing(torch.nn.Linear):
        def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
            state_dict[prefix + "weight"] = state_dict[prefix + "weight"].t()
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    cfg = local_config(tmp_path, every=1, final=False)
    saved = torch.nn.Linear(3, 2)
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        ck.save(step=1, model=saved)
    # The saved weight is (2, 3); this model's is (3, 2) and takes it transposed.
    model = Transposing(2, 3, bias=False)
    model.register_parameter("bias", torch.nn.Parameter(torch.zeros(2)))
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        ck.restore(model=model)
    assert torch.equal(model.weight, saved.weight.t()) and torch.equal(model.bias, saved.bias)


def test_a_model_without_state_saves_and_restores(tmp_path):
    """A parameter-free model (a baseline, a trainer whose state is all in extra): DCP refuses an
    empty state, asking the process group for the rank even in one process."""
    cfg = local_config(tmp_path, every=1, final=False)
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        ck.save(step=3, model=torch.nn.ReLU(), extra={"seen": 12})
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        restored = ck.restore(model=torch.nn.Sequential())
    assert restored.step == 3 and restored.extra == {"seen": 12}


class _Shared(torch.nn.Module):
    """One submodule under two names (ALBERT's layers), and one weight under two names in a module."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(3, 3)
        self.dec = self.enc
        self.w = torch.nn.Parameter(torch.randn(3))
        self.w_out = self.w


class _OwnLoad(torch.nn.Module):
    """A wrapper that saves and loads its module's weights under the module's own names (Lightning
    Fabric's module does), which torch's rules for the wrapper's names would not match."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(3, 2)

    def state_dict(self, *args, **kwargs):
        return self.inner.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, *args, **kwargs):
        return self.inner.load_state_dict(state_dict, *args, **kwargs)


@pytest.mark.parametrize("make", [_Shared, _OwnLoad,
                                  lambda: torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(
                                      torch.nn.Linear(4, 4)), {torch.nn.Linear}, dtype=torch.qint8)],
                         ids=["shared", "own load", "quantized"])
def test_models_whose_state_dict_names_differ_from_their_parameters_restore(tmp_path, make):
    """The check before a restore named the weights as DCP walks the parameters: a shared
    module's second name, a wrapper that loads its own way, and a quantized layer (no parameter
    at all, its weights packed by _save_to_state_dict) were refused, and the quantized model was
    saved as a model without state, its weights lost."""
    cfg = local_config(tmp_path, every=1, final=False)
    torch.manual_seed(0)
    model = make()
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        ck.save(step=1, model=model)
    torch.manual_seed(1)
    fresh = make()
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        assert ck.restore(model=fresh).step == 1
    saved, back = model.state_dict(), fresh.state_dict()
    assert list(saved) == list(back) and saved
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value.dequantize() if value.is_quantized else value,
                               back[key].dequantize() if back[key].is_quantized else back[key]), key
    if make is not _Shared and make is not _OwnLoad:
        assert torch.equal(fresh[0].weight().dequantize(), model[0].weight().dequantize())


def test_an_optimizer_of_a_model_without_state_is_refused_at_save(tmp_path):
    """Its parameters are outside the model, with no name to save their state under: refused,
    as for any model, where the save of a model without state committed a checkpoint that
    every restore with the optimizer refused."""
    cfg = local_config(tmp_path, every=1, final=False)
    temperature = torch.nn.Parameter(torch.ones(()))
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        with pytest.raises(ckptkit.UnstorableStateError, match="which is not a parameter of the model"):
            ck.save(step=1, model=torch.nn.ReLU(), optimizer=torch.optim.Adam([temperature]))
        assert ck.list_checkpoints() == []


def test_a_saved_weight_the_model_lacks_is_refused_however_it_is_named(tmp_path):
    """A weight named like extra state (has_extra_state) was taken for one and passed over, so
    torch copied in every other weight before refusing it; a module given its own
    _load_from_state_dict on the instance (a patch for a buffer added since) was judged by
    torch's rules, which it does not follow, and refused."""
    cfg = local_config(tmp_path, every=1, final=False)

    class Flagged(torch.nn.Module):
        def __init__(self, flag=True):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)
            if flag:
                self.has_extra_state = torch.nn.Parameter(torch.ones(2))

    torch.manual_seed(0)
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        ck.save(step=1, model=Flagged())
    torch.manual_seed(1)
    model = Flagged(flag=False)
    before = copy.deepcopy(model.state_dict())
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        with pytest.raises(ckptkit.IncompatibleCheckpointError, match=r"weights the model lacks: has_extra_state\)"):
            ck.restore(model=model)
    assert_same_state(model.state_dict(), before)

    class Counted(torch.nn.Linear):
        def get_extra_state(self):
            return {"seen": 1}

        def set_extra_state(self, state):
            pass

    cfg = local_config(tmp_path / "extra", every=1, final=False)
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        ck.save(step=1, model=torch.nn.Sequential(Counted(3, 3)))
    plain = torch.nn.Sequential(torch.nn.Linear(3, 3))  # keeps no extra state: the saved one is unexpected
    before = copy.deepcopy(plain.state_dict())
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        with pytest.raises(ckptkit.IncompatibleCheckpointError, match=r"weights the model lacks: 0._extra_state\)"):
            ck.restore(model=plain)
    assert_same_state(plain.state_dict(), before)

    patched = torch.nn.Linear(3, 3)
    patched.register_buffer("scale", torch.full((3,), 2.0))
    own = patched._load_from_state_dict

    def compat(state_dict, prefix, *args):
        state_dict.setdefault(prefix + "scale", torch.ones(3))  # what a checkpoint from before it holds
        return own(state_dict, prefix, *args)

    patched._load_from_state_dict = compat
    cfg = local_config(tmp_path / "patched", every=1, final=False)
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        ck.save(step=1, model=torch.nn.Linear(3, 3))
    with ckptkit.CheckpointManager.from_config(cfg) as ck:
        assert ck.restore(model=patched).step == 1
    assert torch.equal(patched.scale, torch.ones(3))
