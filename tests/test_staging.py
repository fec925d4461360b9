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
