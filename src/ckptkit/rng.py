"""The process's random number generators as checkpointable state.

Exact resume needs every generator a training step draws from to continue where it stopped:
Python's ``random``, numpy's global generator, torch's CPU generator and one per CUDA device.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import torch

try:
    import numpy as np
except ImportError:  # numpy is optional; torch runs without it
    np = None


class RngState:
    """Python ``random``, numpy's global RNG (when installed), torch CPU and every CUDA device.

    ``state_dict()`` reads the generators as they are at that moment and ``load_state_dict()``
    sets them; the object holds nothing itself. The state holds only plain Python values and
    tensors, so it loads with ``torch.load(weights_only=True)`` without allowing any type.

    Each rank draws its own random numbers (dropout masks, sampled batches), so pass it in
    ``rank_extra``, which saves and restores every rank's own state::

        rng = ckptkit.RngState()
        restored = ck.restore(model=model, optimizer=opt, rank_extra={"rng": rng})  # sets the generators
        start = restored.step + 1 if restored else 0
        for step in range(start, total):
            ...
            ck.save(step=step, model=model, optimizer=opt, rank_extra={"rng": rng})

    In ``extra`` (shared state) every rank would get rank 0's generators back, which suits one
    process only. Restore it after anything that seeds or draws while setting up (building the
    model, creating the data loader), so that training continues from the saved state. A
    ``DataLoader`` without a ``generator`` of its own draws a seed from torch's generator each
    time its iterator is made (each ``for`` over it): give it one, or the moment of that draw,
    before or after the restore, shifts every random draw that follows.
    """

    def state_dict(self) -> dict[str, Any]:
        """The current state of every generator, as plain values and tensors."""
        version, internal, gauss_next = random.getstate()
        state: dict[str, Any] = {"python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
                                 "torch": torch.get_rng_state()}
        if np is not None:
            kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
            # numpy's own array and scalar types need allowed globals to load weights-only.
            state["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                              "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set every generator to ``state`` (from ``state_dict``).

        Generators the state does not hold keep theirs. State that this process cannot take
        (numpy not installed, fewer CUDA devices) is skipped with a warning naming it.
        """
        if not isinstance(state, dict) or "python" not in state or "torch" not in state:
            raise ValueError("RngState.load_state_dict: expected the dict that RngState.state_dict() returns "
                             f"(keys 'python', 'torch', ...), got {type(state).__name__}")
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
        torch.set_rng_state(state["torch"])
        skipped = []
        if "numpy" in state:
            if np is None:
                skipped.append("numpy's (numpy is not installed)")
            else:
                saved = state["numpy"]
                np.random.set_state((saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["pos"],
                                     saved["has_gauss"], saved["cached_gaussian"]))
        cuda = state.get("cuda") or []
        if cuda:
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            for device, device_state in enumerate(cuda[:count]):
                torch.cuda.set_rng_state(device_state, device)
            if len(cuda) > count:
                skipped.append(f"CUDA devices {count}..{len(cuda) - 1}'s (this process sees {count} CUDA device(s))")
        if skipped:
            warnings.warn(f"RngState: the saved state of {' and '.join(skipped)} was not restored; "
                          "random draws there will differ from the saved run", RuntimeWarning, stacklevel=2)

    def __repr__(self) -> str:
        return "RngState()"
