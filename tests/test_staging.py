import torch

from ckptkit.staging import Stager


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
