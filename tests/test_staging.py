import collections
import ctypes
import os
import threading

import pytest
import torch

from ckptkit.staging import Stager, stepped_storages


def test_stage_copies_and_reuses_buffers():
    stager = Stager()
    state = {"model": {"w": torch.ones(4, 4)}, "optimizer": {"state": {"w": {"step": torch.tensor(3.0)}},
                                                             "param_groups": [{"lr": 0.1, "params": ["w"]}]},
             "extra": {"note": "x"}}
    first = stager.stage(state)
    assert torch.equal(first["model"]["w"], state["model"]["w"])
    assert first["model"]["w"].data_ptr() != state["model"]["w"].data_ptr(), "a copy, not the live tensor"
    state["model"]["w"].add_(1)
    assert torch.equal(first["model"]["w"], torch.ones(4, 4)), "the copy does not follow training"
    ptr = first["model"]["w"].data_ptr()
    second = stager.stage(state)
    assert second["model"]["w"].data_ptr() == ptr, "the buffer is reused between saves"
    assert torch.equal(second["model"]["w"], torch.full((4, 4), 2.0))
    assert second["optimizer"]["param_groups"] == [{"lr": 0.1, "params": ["w"]}]
    assert stager.nbytes == 4 * 4 * 4 + 4


@pytest.mark.parametrize("deferred", [False, True])
def test_a_tensor_that_appears_twice_is_staged_once(deferred):
    """A weight tied to another module's is in the state dict under both names: one buffer, so
    that the copy and the file hold it once, as torch.save of the live tensors does."""
    stager = Stager()
    tied, other = torch.randn(64, 8), torch.randn(64, 8)
    view = tied[1:]
    state = {"model": {"emb": tied, "head": tied, "other": other, "tail": view}, "extra": {"again": tied}}
    defer = frozenset({tied.untyped_storage().data_ptr()}) if deferred else frozenset()
    seen: dict = {}
    staged = {k: stager.stage(v, None, (k,), defer if k == "model" else frozenset(), seen) for k, v in state.items()}
    model = staged["model"]
    assert model["emb"] is model["head"]
    assert model["emb"] is not model["other"] and model["tail"] is not model["emb"], "other tensors and views stay apart"
    assert len(stager.deferred) == (2 if deferred else 0), "the tied weight and its view, each deferred once"
    assert (staged["extra"]["again"] is model["emb"]) is not deferred, "extra is copied at once, never deferred"
    stager.copy_deferred(stager.deferred)
    assert torch.equal(model["head"], tied) and torch.equal(model["tail"], view)


def test_stage_reallocates_when_the_shape_changes():
    stager = Stager()
    a = stager.stage({"w": torch.zeros(2)})["w"]
    b = stager.stage({"w": torch.zeros(3)})["w"]
    assert a.shape == (2,) and b.shape == (3,)


def test_private_copies_pass_through_and_live_tensors_are_copied():
    from ckptkit.staging import live_storages

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    live = live_storages(model, opt)
    gathered = torch.zeros(5)  # like a full state gathered to rank 0: nobody trains it
    momentum = opt.state[model.weight]["momentum_buffer"]
    staged = Stager().stage({"w": model.weight, "gathered": gathered, "momentum": momentum}, live)
    assert staged["gathered"] is gathered
    assert staged["w"].data_ptr() != model.weight.data_ptr()
    assert staged["momentum"].data_ptr() != momentum.data_ptr()
    view = model.weight[1:]  # a view into a parameter's storage is live, too
    assert Stager().stage({"v": view}, live)["v"].data_ptr() != view.data_ptr()


def test_a_staging_copy_that_fails_fails_the_save_instead_of_raising_on_the_writer():
    """What the writer waits for before it writes (a GPU's queued copies) can fail, with a CUDA
    error say: the save's outcome carries the failure, the write never runs, and the saver is
    ready for the next save, so that no rank raises alone outside the collective."""
    from ckptkit.asyncsave import AsyncSaver
    from ckptkit.checkpoint import Payload
    from ckptkit.ranks import Collectives

    class FailingCopy:  # stands for a CUDA event whose wait reports an error
        def synchronize(self):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    saver = AsyncSaver(Collectives(timeout_s=5, fingerprint={}))
    model = torch.nn.Linear(2, 2)
    written = []
    saver.stage({"model": model.state_dict()}, model, None, copy_always=())
    saver._copies = [FailingCopy()]
    payload = Payload(run_name="r", step=7, epoch=None, format="torch", files=())
    saver.submit(lambda *args: written.append(args) or (7, ["ref"], {}), payload, {})
    step, saved, failures = saver.collect("test")
    assert (step, saved, written) == (7, [], [])
    assert "illegal memory access" in str(failures["(staging)"]) and "step 7" in str(failures["(staging)"])
    saver.submit(lambda *args: (8, ["ref"], {}), payload, {})
    assert saver.collect("test") == (8, ["ref"], {})
    saver.shutdown()


def test_a_staged_state_dict_keeps_the_module_versions():
    """load_state_dict converts what an older module version saved by ``_metadata``: without it
    in the staged copy, an async checkpoint loads as if saved by version 1 of every module."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    sd = model.state_dict()
    staged = Stager().stage({"model": sd, "optimizer": {"state": {}}})
    assert staged["model"]._metadata == sd._metadata and staged["model"]._metadata["1"]["version"] == 2
    assert not hasattr(staged["optimizer"], "_metadata")


Pair = collections.namedtuple("Pair", "a b")


def test_a_namedtuple_is_staged_as_itself():
    """An async save of extra holding a namedtuple raised TypeError (its class was called with
    one generator for all its fields), where a sync save stored it."""
    live = Pair(torch.ones(2), (1, [2.0, torch.zeros(1)]))
    staged = Stager().stage({"extra": {"pair": live, "size": torch.Size([2, 3])}})
    pair = staged["extra"]["pair"]
    assert type(pair) is Pair and torch.equal(pair.a, live.a) and pair.a.data_ptr() != live.a.data_ptr()
    assert pair.b[0] == 1 and pair.b[1][0] == 2.0 and torch.equal(pair.b[1][1], live.b[1][1])
    assert staged["extra"]["size"] == torch.Size([2, 3]) and type(staged["extra"]["size"]) is torch.Size


def test_deferred_tensors_get_their_buffer_now_and_their_copy_later():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stager = Stager()
    staged = stager.stage({"model": model.state_dict(), "other": torch.ones(2)}, live=None,
                          defer=stepped_storages(opt))
    assert [path for *_, path in stager.deferred] == [("model", "weight"), ("model", "bias")]
    assert torch.equal(staged["other"], torch.ones(2)), "what is not deferred is copied at once"
    weight = staged["model"]["weight"]
    stager.copy_deferred(stager.deferred)
    assert torch.equal(weight, model.weight.detach())
    stager.deferred = []
    again = stager.stage({"model": model.state_dict()}, live=None, defer=stepped_storages(opt))
    assert again["model"]["weight"].data_ptr() == weight.data_ptr(), "deferred buffers are reused too"


def test_only_what_the_optimizer_steps_is_deferred():
    """A frozen parameter may change in a forward pass (a codebook), a tensor learning rate in a
    scheduler's step: neither waits for the optimizer, so neither may wait to be copied."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01))
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    stepped = stepped_storages(opt)
    assert model[0].weight.untyped_storage().data_ptr() in stepped
    assert opt.state[model[0].weight]["exp_avg"].untyped_storage().data_ptr() in stepped
    assert model[1].weight.untyped_storage().data_ptr() not in stepped
    assert opt.param_groups[0]["lr"].untyped_storage().data_ptr() not in stepped
    assert stepped_storages(None) == frozenset(), "with no optimizer, nothing waits for a step"
    state_only = stepped_storages(opt, parameters=False)
    assert opt.state[model[0].weight]["exp_avg"].untyped_storage().data_ptr() in state_only
    assert model[0].weight.untyped_storage().data_ptr() not in state_only, \
        "async_copy: optimizer_state copies the parameters before save returns"
    stager = Stager()
    staged = stager.stage(opt.state_dict(), defer=state_only)
    assert {path[-1] for _, _, _, path in stager.deferred} == {"exp_avg", "exp_avg_sq"}, \
        "Adam's step counters, one element each, are copied at once"
    assert torch.equal(staged["state"][0]["step"], opt.state[model[0].weight]["step"])


def test_a_tensor_learning_rate_is_copied_not_passed_through():
    from ckptkit.staging import live_storages

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    staged = Stager().stage(opt.state_dict(), live_storages(model, opt))
    sched.step()  # changes the tensor in place
    assert torch.equal(staged["param_groups"][0]["lr"], torch.tensor(0.01))


def test_buffers_are_copied_before_stage_returns_even_when_parameters_are_deferred():
    """A forward pass changes batch norm's running statistics: their copy cannot wait for the
    next optimizer step, which comes after that forward pass."""
    model = torch.nn.BatchNorm1d(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    staged = Stager().stage(model.state_dict(), live=None, defer=stepped_storages(opt))
    model(torch.randn(8, 4) + 5)
    assert torch.equal(staged["running_mean"], torch.zeros(4))
    assert int(staged["num_batches_tracked"]) == 0


def _background_saver():
    from ckptkit.asyncsave import AsyncSaver
    from ckptkit.ranks import Collectives

    return AsyncSaver(Collectives(timeout_s=5, fingerprint={}))


@pytest.mark.parametrize("when", ["before the copy", "after the copy"])
def test_a_parameter_changed_before_the_next_step_fails_the_save_and_writes_nothing(when):
    """The writer thread cannot see an in-place operation that is still running (its version
    counter moves when it ends), so the verdict is given on the training thread, at the next step
    or collect: any change since save fails the save, whether or not it raced the copy."""
    from ckptkit.checkpoint import Payload

    saver = _background_saver()
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    written = []
    staged = saver.stage({"model": model.state_dict()}, model, opt, copy_always=(), copy="background")
    payload = Payload(run_name="r", step=3, epoch=None, format="torch", files=())
    if when == "after the copy":
        saver.submit(lambda *args: written.append(args) or (3, ["ref"], {}), payload, staged)
        saver._copied.wait()
    with torch.no_grad():
        model.bias.mul_(0)  # outside optimizer.step(): nothing waits for the copy
    if when == "before the copy":
        saver.submit(lambda *args: written.append(args) or (3, ["ref"], {}), payload, staged)
    step, saved, failures = saver.collect("test")
    assert (step, saved, written) == (3, [], [])
    message = str(failures["(staging)"])
    assert "step 3 was not written: model.bias changed in place between save() and the next optimizer.step()" \
        in message
    assert "async_copy: blocking" in message
    staged = saver.stage({"model": model.state_dict()}, model, opt, copy_always=(), copy="background")
    saver.submit(lambda p, s: (4, [torch.equal(s["model"]["bias"], model.bias.detach())], {}), payload, staged)
    assert saver.collect("test") == (4, [True], {})
    saver.shutdown()


def test_a_stage_that_raised_part_way_leaves_nothing_for_the_next_save():
    from ckptkit.checkpoint import Payload

    class Uncopyable:
        def __deepcopy__(self, memo):
            raise RuntimeError("cannot copy")

    saver = _background_saver()
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="cannot copy"):
        saver.stage({"model": model.state_dict(), "z": Uncopyable()}, model, opt, copy_always=(), copy="background")
    model(torch.ones(1, 2)).sum().backward()
    opt.step()  # moves the version counters of what the failed stage had set aside
    staged = saver.stage({"model": model.state_dict()}, model, opt, copy_always=(), copy="background")
    payload = Payload(run_name="r", step=5, epoch=None, format="torch", files=())
    saver.submit(lambda p, s: (5, ["ref"], {}), payload, staged)
    assert saver.collect("test") == (5, ["ref"], {})
    saver.shutdown()


def test_every_optimizer_step_waits_for_the_background_copy_and_close_removes_the_wait():
    from torch.optim.optimizer import _global_optimizer_pre_hooks
    from ckptkit.checkpoint import Payload

    hooks = len(_global_optimizer_pre_hooks)
    saver = _background_saver()
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.SGD(model.parameters(), lr=0.1)  # not the one given to save
    started, release = threading.Event(), threading.Event()
    saver._stager.copy_deferred = lambda deferred, real=saver._stager.copy_deferred: (
        started.set(), release.wait(), real(deferred))[-1]
    staged = saver.stage({"model": model.state_dict()}, model, opt, copy_always=(), copy="background")
    payload = Payload(run_name="r", step=1, epoch=None, format="torch", files=())
    saver.submit(lambda p, s: (1, [s["model"]["weight"].clone()], {}), payload, staged)
    before = model.weight.detach().clone()
    started.wait()
    model(torch.ones(1, 4)).sum().backward()
    stepped = threading.Thread(target=other.step)
    stepped.start()
    stepped.join(0.2)
    assert stepped.is_alive(), "the step waits while the copy is not done"
    assert torch.equal(model.weight.detach(), before)
    release.set()
    stepped.join()
    assert not torch.equal(model.weight.detach(), before)
    step, (saved,), failures = saver.collect("test")
    assert failures == {} and torch.equal(saved, before)
    assert len(_global_optimizer_pre_hooks) == hooks + 1
    saver.shutdown()
    assert len(_global_optimizer_pre_hooks) == hooks


def test_an_optimizer_stepped_in_a_forked_child_does_not_wait_for_the_parent_copy():
    """A child forked while the copy runs (multiprocessing training, a worker that steps) has no
    writer thread: waiting there for the copy would never end."""
    import multiprocessing

    from ckptkit.checkpoint import Payload

    saver = _background_saver()
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    started, release = threading.Event(), threading.Event()
    saver._stager.copy_deferred = lambda deferred, real=saver._stager.copy_deferred: (
        started.set(), release.wait(), real(deferred))[-1]
    staged = saver.stage({"model": model.state_dict()}, model, opt, copy_always=(), copy="background")
    payload = Payload(run_name="r", step=1, epoch=None, format="torch", files=())
    saver.submit(lambda p, s: (1, ["ref"], {}), payload, staged)
    started.wait()
    model(torch.ones(1, 4)).sum().backward()
    child = multiprocessing.get_context("fork").Process(target=opt.step)
    child.start()
    child.join(20)
    alive = child.is_alive()
    if alive:
        child.kill()
    release.set()
    assert not alive and child.exitcode == 0
    assert saver.collect("test") == (1, ["ref"], {})
    saver.shutdown()


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="resident memory is read from Linux's /proc")
def test_buffers_prepared_ahead_are_paged_in_and_the_first_stage_takes_them():
    """New memory costs five times the copy into it to page in: ``prepare`` pays that before the
    first save, and that save copies into what it made."""
    stager = Stager()
    w, m = torch.randn(4096, 4096), torch.randn(4096, 4096)  # 64 MiB each: fresh pages from the kernel
    before = _resident_bytes()
    stager.prepare(stager.plan([(w.shape, w.dtype), (m.shape, m.dtype), (torch.Size([7]), torch.float64)], owner=0))
    assert _resident_bytes() - before >= 0.9 * (w.nbytes + m.nbytes), "the buffers are paged in, not only reserved"
    spares = {b.data_ptr() for bs in stager._spares.values() for b in bs}
    assert len(spares) == 3
    staged = stager.stage({"w": w, "state": {"m": m}})
    assert {staged["w"].data_ptr(), staged["state"]["m"].data_ptr()} <= spares
    assert torch.equal(staged["w"], w) and torch.equal(staged["state"]["m"], m)
    stager.stop_preparing()
    assert stager._spares == {}, "what the first save did not take is released"
    stager.prepare(stager.plan([(w.shape, w.dtype)], owner=0))
    assert stager._spares == {}, "nothing is made once a save has staged"


def _join_preparing():
    for thread in threading.enumerate():
        if thread.name == "ckptkit-prepare":
            thread.join()


def _spare_ptrs(saver):
    return {b.data_ptr() for bs in saver._stager._spares.values() for b in bs}


def _made(stager):
    return {key: len(bufs) for key, bufs in stager._spares.items() if bufs}


def test_a_plan_makes_what_is_missing_and_releases_what_no_owner_needs_any_more():
    """A new training's buffers are made from what its first step is expected to make, then from
    what it made: the second plan of the same owner makes only the difference, and releases what
    was expected in vain; another owner's plan adds to it."""
    stager = Stager()
    a, b, c = (torch.Size([64]), torch.float32), (torch.Size([8, 8]), torch.float32), (torch.Size([]), torch.float32)
    stager.prepare(stager.plan([a, a, b], owner=1))
    assert sorted(stager.plan([a, b, b, c], owner=1)) == sorted([((8, 8), torch.float32), ((), torch.float32)])
    assert _made(stager) == {((64,), torch.float32): 1, ((8, 8), torch.float32): 1}, "the second a is released"
    stager.prepare([((8, 8), torch.float32), ((), torch.float32), ((64,), torch.float32)])
    assert _made(stager) == {((64,), torch.float32): 1, ((8, 8), torch.float32): 2, ((), torch.float32): 1}, \
        "a buffer no plan needs when it is done is dropped"
    stager.prepare(stager.plan([a], owner=2))
    assert _made(stager)[((64,), torch.float32)] == 2
    stager.stop_preparing()
    assert stager.plan([a], owner=3) == [] and stager._spares == {}


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.Adam(ps, amsgrad=True),
    lambda ps: torch.optim.AdamW(ps),
    lambda ps: torch.optim.NAdam(ps),
    lambda ps: torch.optim.RAdam(ps),
    lambda ps: torch.optim.Adamax(ps),
    lambda ps: torch.optim.Adadelta(ps),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.SGD(ps, lr=0.1),
    lambda ps: torch.optim.RMSprop(ps, momentum=0.5, centered=True),
    lambda ps: torch.optim.RMSprop(ps),
], ids=["adam-amsgrad", "adamw", "nadam", "radam", "adamax", "adadelta", "sgd-momentum", "sgd", "rmsprop-centered",
        "rmsprop"])
def test_the_state_a_first_step_makes_is_planned_before_it_but_for_its_scalars(make):
    """What is planned at restore for a new training's optimizer is what its first step makes,
    but for the 0-dim counters, which that step adds: nothing planned is released, nothing else
    is left to make while the first save may be coming."""
    from ckptkit.staging import plain_cpu_likes

    saver = _background_saver()
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))
    opt = make(model.parameters())
    saver.prepare_for(opt)
    _join_preparing()
    planned = _made(saver._stager)
    model(torch.ones(2, 64)).sum().backward()
    opt.step()
    _join_preparing()
    made = collections.Counter((tuple(s), d) for s, d in plain_cpu_likes(opt))
    assert _made(saver._stager) == dict(made)
    assert {key: n for key, n in made.items() if key[0] != ()} == planned
    saver.shutdown()


def test_moments_expected_for_parameters_that_get_no_gradient_are_released_at_the_first_step():
    """AdamW makes moments only for parameters with a gradient: an unused head's expected moments
    are released at the first step, so the spares are what the first save will stage."""
    from ckptkit.staging import plain_cpu_likes

    saver = _background_saver()
    used, unused = torch.nn.Linear(128, 128), torch.nn.Linear(256, 256)
    opt = torch.optim.AdamW([*used.parameters(), *unused.parameters()])
    saver.prepare_for(opt)
    _join_preparing()
    assert len(_spare_ptrs(saver)) == 4 + 4 * 2
    used(torch.ones(1, 128)).sum().backward()
    opt.step()
    _join_preparing()
    assert _made(saver._stager) == dict(collections.Counter((tuple(s), d) for s, d in plain_cpu_likes(opt)))
    assert len(_spare_ptrs(saver)) == 4 + 2 * 3, "four parameters; for the used two, exp_avg, exp_avg_sq and step"
    saver.shutdown()


def test_the_first_step_of_the_optimizer_given_prepares_its_buffers_once_and_no_other_optimizer_does():
    from torch.optim.optimizer import _global_optimizer_post_hooks

    hooks = len(_global_optimizer_post_hooks)
    saver = _background_saver()
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.AdamW(model.parameters())
    saver.prepare_for(opt)
    _join_preparing()
    assert len(_spare_ptrs(saver)) == 2 + 2 * 2, "before any step: weight and bias, and AdamW's two moments of each"
    other = torch.nn.Linear(512, 512)
    other_opt = torch.optim.AdamW(other.parameters())
    other(torch.ones(1, 512)).sum().backward()
    other_opt.step()  # not the optimizer given: nothing is made for it
    _join_preparing()
    assert len(_spare_ptrs(saver)) == 2 + 2 * 2
    model(torch.ones(1, 256)).sum().backward()
    opt.step()  # AdamW makes its state here: the hook sees it, and makes what is not made yet
    _join_preparing()
    spares = _spare_ptrs(saver)
    assert len(spares) == 2 + 3 * 2, "weight and bias; for each, exp_avg, exp_avg_sq and step"
    staged = saver.stage({"model": model.state_dict(), "optimizer": opt.state_dict()}, model, opt, copy_always=())
    state = staged["optimizer"]["state"][0]
    assert {staged["model"]["weight"].data_ptr(), state["exp_avg"].data_ptr(), state["exp_avg_sq"].data_ptr()} <= spares
    assert torch.equal(state["exp_avg"], opt.state[model.weight]["exp_avg"])
    assert saver._stager._spares == {}
    opt.step()
    assert saver._stager._spares == {} and not any(t.name == "ckptkit-prepare" for t in threading.enumerate())
    saver.shutdown()
    assert len(_global_optimizer_post_hooks) == hooks


def test_buffers_are_prepared_for_the_latest_optimizer_given_only():
    """An evaluation loop restores into a new model and optimizer each time with the training's
    async config: the buffers made ahead are for the latest one, not one set per optimizer ever
    given (they added up to the state's size per restore)."""
    saver = _background_saver()
    kept = []  # the evaluation loop's optimizers, still alive
    for _ in range(4):
        model = torch.nn.Linear(128, 128)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.ones(1, 128)).sum().backward()
        opt.step()
        kept.append(opt)
        saver.prepare_for(opt)
        _join_preparing()
        assert len(_spare_ptrs(saver)) == 2 + 2, "weight and bias, and a momentum buffer for each: one set"
    new = torch.optim.AdamW(torch.nn.Linear(128, 128).parameters())  # a new training's: awaited
    saver.prepare_for(new)
    assert set(saver._awaited) == {new}
    saver.shutdown()


def test_a_saver_dropped_without_shutdown_takes_its_global_step_hooks_with_it():
    """torch's optimizer step hooks are global: a manager dropped without close() (a sweep's
    trial) left its hooks behind, and every step of every later optimizer ran them all."""
    import gc

    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

    gc.collect()  # a saver an earlier test left in a reference cycle takes its hooks now, not below
    before = len(_global_optimizer_pre_hooks), len(_global_optimizer_post_hooks)
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        saver = _background_saver()
        saver.prepare_for(torch.optim.AdamW(model.parameters()))  # a new training's: a post-hook
        model(torch.ones(1, 64)).sum().backward()
        opt.step()
        saver.stage({"model": model.state_dict(), "optimizer": opt.state_dict()}, model, opt, copy_always=(),
                    copy="background")  # deferred copies: a pre-hook
        assert len(_global_optimizer_pre_hooks) > before[0] and len(_global_optimizer_post_hooks) > before[1]
        del saver
        gc.collect()
        assert (len(_global_optimizer_pre_hooks), len(_global_optimizer_post_hooks)) == before


def test_a_closed_saver_keeps_no_staging_buffer():
    """A closed manager may stay referenced (a list of results, a callback): the buffers, the
    size of the state, go when it closes."""
    import gc
    import weakref

    saver = _background_saver()
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 64)).sum().backward()
    opt.step()
    staged = saver.stage({"model": model.state_dict(), "optimizer": opt.state_dict()}, model, opt, copy_always=())
    buffers = [weakref.ref(staged["model"]["weight"]), weakref.ref(staged["optimizer"]["state"][0]["momentum_buffer"])]
    del staged
    saver.shutdown()
    gc.collect()
    assert [b() for b in buffers] == [None, None]


def test_an_optimizer_that_holds_state_already_is_prepared_for_at_once():
    """A resumed run: restore loaded the optimizer's state, so its buffers are made before the
    first step, and no step hook is needed."""
    saver = _background_saver()
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 64)).sum().backward()
    opt.step()
    saver.prepare_for(opt)
    _join_preparing()
    assert saver._prepare_hook is None
    assert len(_spare_ptrs(saver)) == 2 + 2, "weight and bias, and a momentum buffer for each"
    saver.shutdown()


class _CountingSGD(torch.optim.Optimizer):
    """Keeps a plain number and a list of tensors in its state, as some optimizers do."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for p in self.param_groups[0]["params"]:
            p.add_(p.grad, alpha=-self.param_groups[0]["lr"])
            st = self.state[p]
            st["calls"] = st.get("calls", 0) + 1
            st["history"] = [p.detach().clone()]
        self.state["steps"] = self.state.get("steps", 0) + 1


def test_an_optimizer_keeping_numbers_and_lists_in_its_state_steps_and_is_prepared_for():
    saver = _background_saver()
    model = torch.nn.Linear(32, 32)
    opt = _CountingSGD(model.parameters(), lr=0.1)
    saver.prepare_for(opt)
    for _ in range(2):
        model(torch.ones(1, 32)).sum().backward()
        opt.step()  # the post-hook must not fail the step
    _join_preparing()
    assert len(_spare_ptrs(saver)) == 2 + 2, "weight and bias, and the tensor in each one's history list"
    saver.shutdown()


def test_a_failure_to_prepare_is_logged_and_never_fails_the_step(caplog, monkeypatch):
    import ckptkit.asyncsave as asyncsave

    def broken(optimizer):
        raise RuntimeError("no threads left")

    monkeypatch.setattr(asyncsave, "expected_likes", broken)
    monkeypatch.setattr(asyncsave, "plain_cpu_likes", broken)
    saver = _background_saver()
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters())
    with caplog.at_level("WARNING", logger="ckptkit.asyncsave"):
        saver.prepare_for(opt)
        model(torch.ones(1, 8)).sum().backward()
        opt.step()
    said = "could not make the first asynchronous save's buffers ahead (RuntimeError: no threads left)"
    assert [r.getMessage() for r in caplog.records].count(said + "; that save makes them") == 2, \
        "once when asked, once at the first step"
    assert saver._stager._spares == {}
    saver.shutdown()


def _exit_at_once():
    pass


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork: a data loader's workers on Linux")
def test_a_child_forked_while_buffers_are_made_exits_though_it_inherits_their_lock_held():
    """A data loader's worker forked while the preparing thread holds the spares' lock inherits
    the lock held, and the exit hook that stops preparing, but not the thread that would release
    the lock: the hook must leave the child alone."""
    import multiprocessing

    saver = _background_saver()
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 64)).sum().backward()
    opt.step()
    saver.prepare_for(opt)  # registers the exit hook
    _join_preparing()
    with saver._stager._spares_lock:
        child = multiprocessing.get_context("fork").Process(target=_exit_at_once)
        child.start()
        child.join(timeout=60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0
    saver.shutdown()


def test_deferred_copies_are_exact_for_dense_and_strided_tensors():
    """The writer copies dense tensors byte for byte; others (transposed, conjugated) go through
    torch, which resolves their strides and lazy bits."""
    stager = Stager()
    dense = torch.randn(64, 33)
    transposed = torch.randn(33, 64).t()
    conj = torch.randn(5, dtype=torch.complex64).conj()
    deferred = [(torch.empty_like(t, memory_format=torch.contiguous_format).resolve_conj(), t, t._version, (i,))
                for i, t in enumerate((dense, transposed, conj))]
    stager.copy_deferred(deferred)
    for buf, src, _, _ in deferred:
        assert torch.equal(buf, src.resolve_conj())
    assert not deferred[2][0].is_conj()


def test_copy_flat_shares_a_large_copy_with_pool_threads_chunk_by_chunk_exactly(monkeypatch):
    from ckptkit import staging

    monkeypatch.setattr(staging, "_PARALLEL_MIN", 1)  # every copy shared, in chunks of 4 KiB
    monkeypatch.setattr(staging, "_CHUNK", 4096)
    monkeypatch.setattr(staging, "usable_cpus", lambda: 4)
    sources = [torch.randn(n) for n in (3 * 1024 + 5, 1, 40 * 1024 + 7)] + [torch.arange(10, dtype=torch.int64)]
    buffers = [torch.empty_like(s) for s in sources]
    taken = collections.Counter()
    real = ctypes.memmove

    def counted(dst, src, n):
        taken[threading.current_thread().name.startswith("ckptkit-hash")] += 1
        return real(dst, src, n)

    monkeypatch.setattr(staging.ctypes, "memmove", counted)
    staging.copy_flat(list(zip(buffers, sources)))
    assert all(torch.equal(b, s) for b, s in zip(buffers, sources))
    assert sum(taken.values()) >= 44, "in chunks of 4 KiB"


def test_copy_flat_does_not_wait_for_a_pool_busy_with_other_work(monkeypatch):
    """The caller copies every chunk no pool thread has taken: a pool whose threads are all held
    by another save's work lends none, and the copy still ends."""
    from ckptkit import staging
    from ckptkit.hashing import hash_pool

    monkeypatch.setattr(staging, "_PARALLEL_MIN", 1)
    monkeypatch.setattr(staging, "_CHUNK", 4096)
    monkeypatch.setattr(staging, "usable_cpus", lambda: 4)
    release = threading.Event()
    pool = hash_pool()
    held = [pool.submit(release.wait) for _ in range(pool._max_workers)]
    sources = [torch.randn(64 * 1024)]
    buffers = [torch.empty_like(sources[0])]
    done = threading.Event()
    copier = threading.Thread(target=lambda: (staging.copy_flat(list(zip(buffers, sources))), done.set()), daemon=True)
    copier.start()
    finished = done.wait(60)  # a bound on a hang, not a speed goal
    release.set()
    for f in held:
        f.result()
    assert finished and torch.equal(buffers[0], sources[0])


def test_torch_step_wrapper_is_found_so_a_save_inside_a_step_is_seen():
    from ckptkit import staging

    assert staging._STEP_WRAPPER is not None, "torch's optimizer step wrapper moved: inside_optimizer_step sees nothing"
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    opt.register_step_pre_hook(lambda *_: seen.append(staging.inside_optimizer_step()))
    opt.step()
    assert seen == [True] and not staging.inside_optimizer_step()


OUT_OF_MEMORY_STAGING = """
import json, logging, resource, sys, threading, torch, ckptkit
from ckptkit.plugins import make_plugin_manager
folder, scenario, copy, headroom = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
logging.basicConfig(level=logging.WARNING, format="LOG %(name)s: %(message)s")
torch.set_num_threads(1)
ck = ckptkit.CheckpointManager.from_config(
    {"backends": {"disk": {"type": "local", "path": folder}},
     "roles": {"resume": {"backends": ["disk"], "every_n_steps": 1, "async": True, "async_copy": copy}}},
    run_name="exp", plugin_manager=make_plugin_manager(autoload=False))
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(6)])
opt = torch.optim.AdamW(model.parameters())
threading.stack_size(1 << 18)
def limit():
    size = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (size + headroom * 2**20, resource.RLIM_INFINITY))
def unlimit():
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
told = {}
if scenario == "ahead":  # a new training: the buffers for its first save are made after restore
    limit()
    told["restored"] = ck.restore(model, opt)
    for t in threading.enumerate():
        if t.name == "ckptkit-prepare":
            t.join()
    unlimit()
    told["spares"] = sum(len(v) for v in ck._async._stager._spares.values())
else:
    model(torch.ones(2, 1024)).sum().backward()
    opt.step()
    limit()
    try:
        ck.save(step=0, model=model, optimizer=opt)
        told["save"] = "returned"
    except BaseException as exc:
        told["save"] = f"{type(exc).__name__}: {exc}"
    unlimit()
    told["held"] = ck._async._stager.nbytes + sum(b.nbytes for b, *_ in ck._async._stager.deferred)
ck.save(step=1, model=model, optimizer=opt)
told["then"] = [r.step for r in ck.wait()]
ck.close()
print(json.dumps(told, default=str))
"""


# 24 MiB: short of the parameters' copy (24 MiB); 40: short of the optimizer's moments, copied later.
@pytest.mark.parametrize("scenario, copy, headroom", [("stage", "blocking", 24), ("stage", "optimizer_state", 40),
                                                      ("ahead", "optimizer_state", 24)])
def test_staging_that_runs_out_of_memory_releases_what_it_made_and_says_so(tmp_path, scenario, copy, headroom):
    """Memory-tight probe: a failed async save's copy kept the buffers it had made (the next
    training step then ran out of memory) and raised torch's bare allocator error; the buffers
    made ahead after restore died in an unhandled thread exception, keeping theirs too."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY_STAGING, str(tmp_path), scenario, copy, str(headroom)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    told = json.loads(proc.stdout.strip().splitlines()[-1])
    assert told["then"] == [1], "the next save works once memory is back"
    if scenario == "stage":
        assert told["save"].startswith("MemoryError: async save: this machine ran out of memory"), told
        assert "roles.resume.async: false" in told["save"] and told["held"] == 0
    else:
        assert told["spares"] == 0 and "Exception in thread" not in proc.stderr
        assert "making the async save's buffers ahead failed" in proc.stderr
