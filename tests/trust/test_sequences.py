"""Random sequences of save, failed save, corruption, prune and restore on the local backend.

hypothesis drives a run through saves (each prunes, keep_last 1 to 5), saves that fail at a
chosen stage, bytes flipped in place in a stored file, ``ckptkit prune`` (which must verify what
it keeps) and restarts that restore, while a second run shares the root. After every step:

- the newest checkpoint that verifies is never deleted (after a save, that is the new one);
- a failed save commits nothing and changes nothing stored;
- the other run's folders are never touched, its leftovers included;
- restore returns the newest checkpoint that verifies, with that step's weights; with
  checkpoints but none intact it raises ``CorruptCheckpointError``; it never loads a corrupt one.

Whether a checkpoint verifies is known independently of ckptkit: it does unless a file of its
folder differs from what the folder held right after its save returned (two flips of one byte
undo each other, so a set of flipped steps would not do).

Short form: 50 sequences; long form: 1,000 (hypothesis profiles in ``trust.common``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings

import pytest
import torch
import yaml
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import ckptkit
from ckptkit import cli
from ckptkit.errors import CorruptCheckpointError, SaveError
from ckptkit.plugins import make_plugin_manager

from trust.common import LONG, PROFILE
from trust.faults import FaultyLocalBackend

pytestmark = pytest.mark.timeout(3600 if LONG else 300)

RUN, OTHER = "run", "other"


def model_at(step: int) -> torch.nn.Module:
    m = torch.nn.Linear(8, 4)
    with torch.no_grad():
        m.weight.fill_(float(step))
        m.bias.fill_(-float(step))
    return m


def plugin_manager():
    pm = make_plugin_manager(autoload=False)
    pm.add_backend_type("faultylocal", FaultyLocalBackend)
    return pm


def tree(path: str) -> dict[str, tuple[bytes, float] | None]:
    """Every folder and file under ``path``, with each file's bytes and modification time."""
    out: dict[str, tuple[bytes, float] | None] = {}
    for dirpath, _, filenames in os.walk(path):
        if dirpath != path:
            out[os.path.relpath(dirpath, path) + "/"] = None
        for n in filenames:
            full = os.path.join(dirpath, n)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = (f.read(), os.stat(full).st_mtime)
    return out


class Sequences(RuleBasedStateMachine):
    """Save, fail, corrupt and restore; ``WithCliPrune`` adds ``ckptkit prune``."""

    def __init__(self):
        super().__init__()
        # On tmpfs where there is one: these sequences test logic, not durability, and fsync
        # on a disk would take most of their time.
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.tmp = tempfile.mkdtemp(prefix="ckptkit-sequences-", dir=shm)
        self.root = os.path.join(self.tmp, "store")
        self.ck: ckptkit.CheckpointManager | None = None
        # One plugin manager for the whole sequence: each manager unregisters its backends when
        # closed, and loading entry points again for every restart would be most of the time.
        self.pm = plugin_manager()

    def teardown(self):
        if self.ck is not None:
            self.ck.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the world --------------------------------------------------------------------------

    def config(self, btype: str) -> dict:
        return {"run_name": RUN,
                "backends": {"scratch": {"type": btype, "path": self.root, "leftover_grace_s": 0}},
                "roles": {"resume": {"backends": ["scratch"], "every_n_steps": 1, "keep_last": self.keep}}}

    def manager(self, run_name: str = RUN) -> ckptkit.CheckpointManager:
        return ckptkit.CheckpointManager.from_config(self.config("faultylocal"), run_name=run_name,
                                                     plugin_manager=self.pm)

    def present(self) -> set[int]:
        """Steps of the run whose folder holds a manifest: committed, as far as the disk shows."""
        run = os.path.join(self.root, RUN)
        names = os.listdir(run) if os.path.isdir(run) else []
        return {int(n[5:]) for n in names
                if n.startswith("step-") and os.path.exists(os.path.join(run, n, "manifest.json"))}

    def folder(self, step: int) -> str:
        return os.path.join(self.root, RUN, f"step-{step:010d}")

    def files(self, step: int) -> dict[str, bytes]:
        out = {}
        for name in sorted(os.listdir(self.folder(step))):
            with open(os.path.join(self.folder(step), name), "rb") as f:
                out[name] = f.read()
        return out

    @property
    def corrupt(self) -> set[int]:
        return {s for s in self.present() if self.files(s) != self.written[s]}

    def verifying(self) -> set[int]:
        return self.present() - self.corrupt

    def newest_verifying(self) -> int | None:
        return max(self.verifying(), default=None)

    @initialize(keep=st.integers(1, 5))
    def start(self, keep):
        self.keep = keep
        self.written: dict[int, dict[str, bytes]] = {}  # each step's files as its save left them
        self.next_step = 1
        self.cli_config = os.path.join(self.tmp, "ckptkit.yaml")
        with open(self.cli_config, "w") as f:
            yaml.safe_dump(self.config("local"), f)
        # The other run: two checkpoints and an old leftover of each kind, all someone else's.
        with self.manager(OTHER) as other:
            for step in (1, 2):
                other.save(step=step, model=model_at(step))
        for leftover in ("step-0000000007", ".tmp-step-0000000009-0123456789ab"):
            path = os.path.join(self.root, OTHER, leftover)
            os.makedirs(path)
            with open(os.path.join(path, "state.pt"), "wb") as f:
                f.write(b"half a save")
            old = time.time() - 86400
            os.utime(os.path.join(path, "state.pt"), (old, old))
        self.other = tree(os.path.join(self.root, OTHER))
        self.ck = self.manager()

    # -- rules ------------------------------------------------------------------------------

    @rule()
    def save(self):
        step = self.next_step
        newest = self.newest_verifying()
        refs = self.ck.save(step=step, model=model_at(step))
        self.ck.wait()  # the prune after it runs on a thread of its own
        assert [r.step for r in refs] == [step]
        self.written[step] = self.files(step)
        self.next_step += 1
        # A newer checkpoint than this one can verify: restore skipped it when it was damaged
        # (or unreadable), and it came back since. Its prune must keep that one too.
        assert self.newest_verifying() == max(step, newest or step), (
            step, newest, sorted(self.present()), sorted(self.corrupt))

    @rule(stage=st.sampled_from(["write-1", "write-2", "write-3", "commit"]))
    def failed_save(self, stage):
        step = self.next_step
        op, _, nth = stage.partition("-")
        fault = self.ck.router.instances["scratch"].faults.add(op=op, nth=int(nth or 1))
        before = tree(os.path.join(self.root, RUN))
        try:
            with pytest.raises(SaveError):
                self.ck.save(step=step, model=model_at(step))
        finally:
            self.ck.router.instances["scratch"].faults.clear()
        assert fault.fired == 1
        # Nothing committed, nothing stored changed, nothing left over.
        assert tree(os.path.join(self.root, RUN)) == before
        self.next_step += 1

    @precondition(lambda self: bool(self.present()))
    @rule(data=st.data())
    def corrupt_a_file(self, data):
        step = data.draw(st.sampled_from(sorted(self.present(), reverse=True)), label="step")
        name = data.draw(st.sampled_from(sorted(os.listdir(self.folder(step)))), label="file")
        path = os.path.join(self.folder(step), name)
        size = os.path.getsize(path)
        at = data.draw(st.integers(0, size - 1), label="byte")
        with open(path, "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0xFF]))

    @rule()
    def restart_and_restore(self):
        self.ck.close()
        self.ck = self.manager()
        m = model_at(-1)
        expected = self.newest_verifying()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if expected is None and self.present():
                with pytest.raises(CorruptCheckpointError):
                    self.ck.restore(model=m)
                # Training goes on from its own weights, above every step the run holds (a save
                # at or below them would be refused as another training's).
                self.next_step = max(self.present()) + 1
                return
            restored = self.ck.restore(model=m)
        if expected is None:
            assert restored is None
            return
        assert restored is not None and restored.step == expected, (
            restored and restored.step, expected, sorted(self.present()), sorted(self.corrupt))
        assert torch.equal(m.weight, model_at(expected).weight) and torch.equal(m.bias, model_at(expected).bias)
        self.next_step = expected + 1

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def the_other_run_is_untouched(self):
        if self.ck is not None:
            assert tree(os.path.join(self.root, OTHER)) == self.other

    @invariant()
    def the_newest_verifying_checkpoint_verifies(self):
        newest = self.newest_verifying()
        if self.ck is not None and newest is not None:
            [ref] = [r for r in self.ck.list_checkpoints() if r.step == newest]
            self.ck.verify(ref)


class WithCliPrune(Sequences):
    @rule(keep=st.integers(1, 5), dry_run=st.booleans())
    def ckptkit_prune(self, keep, dry_run):
        newest = self.newest_verifying()
        before = tree(os.path.join(self.root, RUN))
        argv = ["prune", self.cli_config, "--keep-last", str(keep)] + (["--dry-run"] if dry_run else [])
        assert cli.main(argv) == 0
        if dry_run:
            assert tree(os.path.join(self.root, RUN)) == before
        assert self.newest_verifying() == newest, (
            f"prune --keep-last {keep} left {sorted(self.present())} (corrupt: {sorted(self.corrupt)}); "
            f"step {newest} verified before")


TestSequences = Sequences.TestCase
TestSequences.settings = PROFILE

TestSequencesWithCliPrune = WithCliPrune.TestCase
TestSequencesWithCliPrune.settings = PROFILE


def test_prune_keeps_the_newest_checkpoint_that_verifies():
    """The minimal sequence that broke this on issue 8 (item 7): save 1 and 2, corrupt step 2's
    state.pt in place, ``ckptkit prune --keep-last 1``."""
    machine = WithCliPrune()
    try:
        machine.start(keep=3)
        machine.save()
        machine.save()
        path = os.path.join(machine.root, RUN, "step-0000000002", "state.pt")
        with open(path, "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0xFF]))
        machine.ckptkit_prune(keep=1, dry_run=False)
    finally:
        machine.teardown()
