"""The training loop every page shows, run as written: a first run to its end, then a restart
after the last step's save (a job killed during finalize, or started again once done)."""

import re
from pathlib import Path

import pytest
import torch
import yaml

import ckptkit
from ckpt_helpers import local_config

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PAGES = ["README.md", "docs/index.md", "docs/quickstart.md", "docs/migrate.md"]


def loops() -> list[tuple[str, str]]:
    """Each page's single-process training loops (the torchrun one needs a process group)."""
    found = []
    for page in PAGES:
        for code in FENCE.findall((ROOT / page).read_text(encoding="utf-8")):
            if "range(start" in code and "init_process_group" not in code:
                found.append((page, code))
    return found


class Loader:
    """A data loader with the state_dict protocol, as torchdata's StatefulDataLoader has."""

    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def test_every_page_shows_the_loop():
    assert sorted({page for page, _ in loops()}) == sorted(PAGES)


@pytest.mark.parametrize("page,code", loops(), ids=[f"{p}-{i}" for i, (p, _) in enumerate(loops())])
def test_the_documented_loop_finishes_when_restarted_after_its_last_save(tmp_path, monkeypatch, page, code):
    """A restart that restores the last step trains no step: the loop read ``step`` and ``loss``
    that only its body sets (NameError), so a job killed during finalize never published."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckptkit.yaml").write_text(yaml.safe_dump(local_config(tmp_path, every=1, run_name="exp-42")))
    finals = []
    published = ckptkit.CheckpointManager.finalize

    def finalize(self, **kwargs):
        finals.append((kwargs["step"], dict(kwargs.get("metrics") or {})))
        return published(self, **kwargs)

    monkeypatch.setattr(ckptkit.CheckpointManager, "finalize", finalize)

    def run() -> None:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)

        def train_step() -> float:
            loss = model(torch.ones(2, 3)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss.item()

        names = {"model": model, "opt": opt, "sched": sched, "train_step": train_step, "total": 4,
                 "total_steps": 4, "epoch": 0, "es_state": {"best": 1.0}, "loader": Loader(),
                 "run_name": "exp-42"}
        exec(compile(code, page, "exec"), names)

    run()
    run()
    assert [step for step, _ in finals] == [3, 3], finals
    assert finals[1][1] == finals[0][1] and "loss" in finals[0][1], finals
    assert (tmp_path / "published" / "exp-42" / "final").is_dir()
