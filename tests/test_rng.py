"""RngState: every generator a training step draws from continues where the checkpoint left it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import ckptkit
from ckpt_helpers import local_config, make_model, train_step


def draws() -> list:
    """A few numbers from each generator; the Gaussians leave numpy's and Python's caches half-used."""
    numbers = [random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(1).tolist(),
               torch.rand(3).tolist(), torch.randint(0, 1000, (2,)).tolist()]
    for device in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        numbers.append(torch.rand(3, device=f"cuda:{device}").tolist())
    return numbers


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_restored_generators_draw_what_the_saved_ones_would_have(tmp_path, pm, fmt):
    cfg = local_config(tmp_path)
    cfg["roles"]["resume"]["format"] = fmt
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draws()
    model, opt = make_model()
    train_step(model, opt)
    ck = ckptkit.CheckpointManager.from_config(cfg, plugin_manager=pm)
    ck.save(step=1, model=model, optimizer=opt, extra={"rng": ckptkit.RngState()})
    expected = draws()
    ck.close()

    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    assert draws() != expected, "the test would pass without restoring anything"
    model2, opt2 = make_model(seed=5)
    ck2 = ckptkit.CheckpointManager.from_config(cfg, plugin_manager=pm)
    rng = ckptkit.RngState()
    restored = ck2.restore(model=model2, optimizer=opt2, extra={"rng": rng})
    assert restored.step == 1 and set(restored.extra["rng"]) >= {"python", "numpy", "torch"}
    assert draws() == expected
    ck2.close()


def test_state_loads_weights_only_without_allowed_globals(tmp_path):
    np.random.randn(1)  # numpy's state then holds a cached Gaussian, a float
    state = ckptkit.RngState().state_dict()
    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    expected = draws()
    ckptkit.RngState().load_state_dict(loaded)
    assert draws() == expected


def test_state_the_process_cannot_take_is_named_in_a_warning(monkeypatch):
    state = ckptkit.RngState().state_dict()
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cuda = state.get("cuda", [])
    state["cuda"] = cuda + [cuda[0] if cuda else torch.zeros(16, dtype=torch.uint8)]  # one device more than there are
    expected = draws()
    with pytest.warns(RuntimeWarning, match=rf"CUDA devices {visible}\.\.{visible}'s"):
        ckptkit.RngState().load_state_dict(state)
    assert draws() == expected, "the generators that could be restored were"


def test_anything_else_is_refused_with_what_was_expected():
    with pytest.raises(ValueError, match="RngState.state_dict"):
        ckptkit.RngState().load_state_dict(torch.get_rng_state())
