"""ckptkit as PyTorch Lightning's checkpointing: one callback added to ``Trainer(callbacks=[...])``.

``CkptkitCheckpoint`` takes the place of Lightning's ``ModelCheckpoint``. Every
``roles.resume.every_n_steps`` optimizer steps it saves Lightning's whole training checkpoint
(loops, optimizers, schedulers, callbacks, precision plugin, hyperparameters, datamodule) plus
each rank's random generators through ``CheckpointManager.save``, so the resume backends,
``keep_last``/``keep_best`` pruning and the commit protocol are ckptkit's. When ``fit`` starts
it restores the newest committed checkpoint and hands it to Lightning's own restore, as
``fit(ckpt_path=...)`` would; at the end of ``fit`` the final model goes to the final role once.

Lightning builds its checkpoint dict and restores from one only inside its private
``trainer._checkpoint_connector`` (public ``ckpt_path`` values are file paths, read before any
callback runs). The callback uses that connector's ``dump_checkpoint`` and its loaded-checkpoint
slot, which every Lightning 2.x release has; ``_connector`` refuses clearly where they are missing.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import os
import warnings
from typing import Any, Iterable, Mapping

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Checkpoint, EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
    from lightning.pytorch.utilities.model_helpers import is_overridden
except ImportError as exc:  # pragma: no cover - the extra is what brings it
    raise ImportError("ckptkit.integrations.lightning needs PyTorch Lightning 2.x: "
                      'pip install "ckptkit[lightning]"') from exc

from .. import gather
from ..config import Config, check_run_name
from ..errors import ConfigError, IncompatibleCheckpointError
from ..asyncsave import sigterm_left_to_trainer
from ..manager import CheckpointManager
from ..rng import RngState

__all__ = ["CkptkitCheckpoint"]

log = logging.getLogger(__name__)

# Where the Lightning checkpoint (all of it but the weights) sits in ckptkit's shared extra.
LIGHTNING_KEY = "lightning"
RNG_KEY = "rng"
# Each rank's data loader states, as Lightning's fit loop keeps them (``combined_loader``): a
# loader over a rank's own shard of the data has a position of its own on each rank.
LOADERS_KEY = "loaders"
# The optimizers' classes, checked at a restore as ``CheckpointManager.restore(optimizer=)`` does:
# Lightning loads their state itself, and would load AdamW's into an Adam without a word.
OPTIMIZERS_KEY = "optimizer_classes"
# Whether early stopping had ended the fit when it saved, as every rank agreed: the callback's
# own state (rank 0's) says so only where rank 0 decided the stop.
STOPPED_KEY = "early_stopped"
_LOADERS_PATH = ("loops", "fit_loop", "state_dict", "combined_loader")

# What each ModelCheckpoint option becomes with ckptkit: the refusal names the user's own settings.
_MODEL_CHECKPOINT_OPTIONS = {
    "dirpath": "a backend's path (backends: {{name: {{type: local, path: {value}}}}})",
    "every_n_train_steps": "roles.resume.every_n_steps: {value}",
    "save_top_k": "roles.resume.keep_last (or keep_best with a monitor): {value}",
    "monitor": "roles.resume.keep_best: {{metric: {value}, mode: ..., count: ...}}",
    "every_n_epochs": "a step count in roles.resume.every_n_steps (ckptkit saves by optimizer step)",
    "train_time_interval": "a step count in roles.resume.every_n_steps (ckptkit saves by optimizer step)",
    "save_last": "nothing: the newest committed checkpoint is always the one resumed",
}


def _connector(trainer: pl.Trainer) -> Any:
    connector = getattr(trainer, "_checkpoint_connector", None)
    if connector is None or not callable(getattr(connector, "dump_checkpoint", None)) \
            or not hasattr(connector, "_loaded_checkpoint"):
        raise RuntimeError(f"CkptkitCheckpoint does not know this Lightning ({pl.__version__}): its trainer has no "
                           "checkpoint connector with dump_checkpoint and _loaded_checkpoint. Install a "
                           'Lightning 2.x release: pip install "ckptkit[lightning]"')
    return connector


def _plain_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Lightning's logged scalars as floats (what manifests and ``keep_best`` read)."""
    out = {}
    for name, value in metrics.items():
        if torch.is_tensor(value) and value.numel() == 1:
            out[name] = float(value.item())
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def _plain_params(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters a registry can record as they are; richer ones stay in the checkpoint only."""
    return {k: v for k, v in hparams.items()
            if isinstance(k, str) and k and (v is None or isinstance(v, (str, int, float, bool)))}


class CkptkitCheckpoint(Checkpoint):
    """Lightning's checkpointing routed by ckptkit: resume checkpoints to the resume backends, the final model once.

    Add it to the trainer and nothing else changes::

        trainer = Trainer(max_steps=1000, callbacks=[CkptkitCheckpoint("ckptkit.yaml")])
        trainer.fit(model)   # resumes from the newest committed checkpoint of the run, if any

    ``config`` is a YAML path, a dict or a ``Config``; ``run_name`` wins over the config's.
    ``safe_globals`` lists types in the Lightning checkpoint (a hyperparameter's class, say)
    that safe loading may rebuild; they are refused before anything is written otherwise.
    ``params`` are the model settings the final backends record; by default the plain values
    of the LightningModule's ``hparams``. ``finalize=False`` leaves the final model to the caller.

    Supported strategies: a single device and DDP (``strategy="ddp"``), where the manager's
    collectives run on every rank. ``ModelCheckpoint`` in the same trainer is refused: its files
    would bypass the routing and pruning, and two checkpointers would disagree on what to resume.
    """

    def __init__(self, config: str | os.PathLike | Mapping | Config, run_name: str | None = None, *,
                 safe_globals: Iterable[Any] = (), params: Mapping[str, Any] | None = None,
                 finalize: bool = True, on_error: str = "raise"):
        super().__init__()
        # Checked here, before any process starts, so a typo fails at Trainer(...), not on the ranks.
        self.config = Config.load(config)
        if self.config.resume is None:
            raise ConfigError("roles.resume: CkptkitCheckpoint needs resume backends to checkpoint Lightning's "
                              "training to; declare roles.resume in the config")
        self.run_name = None if run_name is None else check_run_name(run_name)
        self.safe_globals = list(safe_globals)
        self.params = dict(params) if params is not None else None
        self.finalize = finalize
        self.on_error = on_error
        self.manager: CheckpointManager | None = None
        self.restored_step: int | None = None
        # The epoch and metrics of the step restored, and whether this fit trained at all: a fit
        # restored finished is skipped by Lightning, on_train_end included.
        self._restored_as: tuple[int | None, dict[str, float]] = (None, {})
        self._trained = False
        self._last_saved: int | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._fast_forward: tuple[Any, Any] | None = None  # a loop method wrapped until the first batch
        self._saved_optimizers: list[str] | None = None
        # Whether the last save held an early stopping that had stopped the fit.
        self._saved_stopped = False
        # Whether the step restored was saved by a fit that early stopping ended (None: saved
        # before ckptkit recorded it, when the callback's state tells).
        self._restored_stopped: bool | None = None
        # A due step whose save waits for its validation, and whether it ended its epoch.
        self._after_validation: tuple[int, bool] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(run_name=self.run_name or self.config.run_name)

    # -- checks -------------------------------------------------------------------------------

    def _check_trainer(self, trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or \
                type(strategy).__name__ not in ("SingleDeviceStrategy", "DDPStrategy"):
            raise ConfigError(
                f"CkptkitCheckpoint supports a single device and strategy='ddp'; this trainer uses "
                f"{type(strategy).__name__}, whose checkpoint is sharded or held by its own engine. Use "
                "ckptkit's CheckpointManager in a loop of your own for FSDP, or remove CkptkitCheckpoint")
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger) and logger._log_model:
                warnings.warn("MLFlowLogger(log_model=...) uploads the files ModelCheckpoint writes; with "
                              "CkptkitCheckpoint there are none, so it uploads nothing. The final model reaches "
                              "MLflow through roles.final; set log_model=False to say so", UserWarning, stacklevel=2)
        others = [cb for cb in trainer.callbacks if isinstance(cb, Checkpoint) and cb is not self]
        for cb in others:
            if isinstance(cb, ModelCheckpoint):
                raise ConfigError(self._model_checkpoint_message(cb))
            raise ConfigError(f"{type(cb).__name__} is a second checkpointing callback beside CkptkitCheckpoint: "
                              "two checkpointers would disagree on what to resume; keep one")

    @staticmethod
    def _model_checkpoint_message(cb: ModelCheckpoint) -> str:
        defaults = ModelCheckpoint()
        mapped = []
        for option, target in _MODEL_CHECKPOINT_OPTIONS.items():
            attr = {"every_n_train_steps": "_every_n_train_steps", "every_n_epochs": "_every_n_epochs",
                    "train_time_interval": "_train_time_interval"}.get(option, option)
            value = getattr(cb, attr, None)
            # Lightning sets every_n_epochs to 0 itself when a step or time interval is given.
            if value != getattr(defaults, attr, None) and value is not None and not (
                    option == "every_n_epochs" and value == 0):
                mapped.append(f"{option}={value!r} -> {target.format(value=value)}")
        detail = ("; ".join(mapped)) if mapped else "it has no options beyond the defaults"
        return ("ModelCheckpoint and CkptkitCheckpoint are both in Trainer(callbacks=...): ModelCheckpoint's files "
                "would bypass ckptkit's routing, pruning and commit protocol, and 'last' would mean two things. "
                f"Remove ModelCheckpoint and set its options in the ckptkit config instead ({detail})")

    # -- resume ---------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trained = False
        self._check_trainer(trainer)
        connector = _connector(trainer)
        if self.manager is None:
            # Built here, not in __init__: under DDP each rank's process group exists only now.
            # Lightning sets its own SIGTERM handler when the fit starts, which stops at the next step and
            # tears down (closing the manager: the async save in flight commits).
            with sigterm_left_to_trainer():
                self.manager = CheckpointManager.from_config(self.config, run_name=self.run_name,
                                                             on_error=self.on_error)
        lazy = is_overridden("configure_model", pl_module)
        if lazy and next(iter(pl_module.parameters()), None) is None:
            raise ConfigError(
                f"{type(pl_module).__name__} has no parameters until configure_model runs, and CkptkitCheckpoint "
                "restores the weights in setup, before it: a resumed fit would fail to load them. Create the "
                "layers in __init__ (CkptkitCheckpoint supports single-device and DDP training, where "
                "configure_model is not needed)")
        try:
            restored = self.manager.restore(model=pl_module, safe_globals=self.safe_globals, rank_extra={})
        except IncompatibleCheckpointError as exc:
            if lazy:
                exc.add_note("CkptkitCheckpoint restores the weights before configure_model runs: layers made "
                             "there are not in the module yet. Create them in __init__")
            raise
        if restored is None:
            return
        checkpoint = restored.extra.get(LIGHTNING_KEY)
        if not isinstance(checkpoint, dict):
            raise ConfigError(f"{restored.ref.uri} was not written by CkptkitCheckpoint (its extra holds no "
                              f"{LIGHTNING_KEY!r} state); resume it with the loop that wrote it, or use a new run_name")
        checkpoint = _with_loaders(checkpoint, restored.rank_extra.get(LOADERS_KEY))
        # Lightning loads the weights from here after LightningModule.setup, which runs after this
        # and may load weights of its own (a pretrained backbone) into the module: a copy, so
        # that the restored ones win, as they do from a file. It is dropped once Lightning loaded
        # it (on_fit_start), before the optimizers' state is restored.
        checkpoint["state_dict"] = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                                    for k, v in pl_module.state_dict().items()}
        from lightning.pytorch.utilities.migration.utils import _pl_migrate_checkpoint

        connector._loaded_checkpoint = _pl_migrate_checkpoint(checkpoint, restored.ref.uri)
        self._pending_rng = restored.rank_extra.get(RNG_KEY)
        self._saved_optimizers = restored.extra.get(OPTIMIZERS_KEY)
        self._restored_stopped = restored.extra.get(STOPPED_KEY)
        self.restored_step = self._last_saved = restored.step
        self._restored_as = (restored.epoch, dict(restored.metrics))
        log.info("ckptkit: resuming run %r from %s (global step %d)", self.manager.run_name, restored.ref.uri,
                 restored.step)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # fit(ckpt_path=...) is loaded after setup, over what was restored here: the fit would go
        # on from that file with this run's random state, and its saves would write behind the
        # run's newer steps. Starting a new run from a Lightning file is fine.
        # Lightning's own SLURM requeue file (hpc_ckpt_*.ckpt), which it picks by itself, is let through.
        hpc = getattr(_connector(trainer), "_hpc_resume_path", None)
        if trainer.ckpt_path is not None and trainer.ckpt_path != hpc and self.restored_step is not None:
            raise ConfigError(
                f"fit(ckpt_path={str(trainer.ckpt_path)!r}) and CkptkitCheckpoint both restore: Lightning loaded "
                f"that file over step {self.restored_step}, which ckptkit restored from run "
                f"{self.manager.run_name!r}. Remove ckpt_path from fit(): CkptkitCheckpoint resumes the newest "
                "committed checkpoint. To start from that file instead, give CkptkitCheckpoint a new run_name")
        self._check_optimizers(trainer)
        stopped = self._restored_stopped if self._restored_stopped is not None else _early_stopped(trainer)
        if self.restored_step is not None and stopped:
            # Lightning keeps trainer.should_stop out of its checkpoint: a fit that early stopping
            # had ended trained on to the next validation and published again. Its callbacks'
            # state is back by now; set as it was, the fit ends once its min_steps and min_epochs
            # are done (at once, for a finished fit). A fit stopped otherwise (a time budget, to
            # be requeued) trains on, as it does from Lightning's own checkpoint.
            trainer.should_stop = True
            log.info("ckptkit: step %d of run %r was saved by a fit that early stopping ended: it stays stopped",
                     self.restored_step, self.manager.run_name)
        loaded = getattr(_connector(trainer), "_loaded_checkpoint", None)
        if self.restored_step is not None and not trainer.strategy.restore_checkpoint_after_setup and loaded:
            loaded.pop("state_dict", None)  # in the module now: the copy made in setup goes
        self._restore_rng_at_epoch_end()

    def _check_optimizers(self, trainer: pl.Trainer) -> None:
        saved, self._saved_optimizers = self._saved_optimizers, None
        if saved is None:
            return
        live = [gather.optimizer_class(o) for o in trainer.optimizers]
        if len(saved) != len(live) or not all(gather.same_class(a, b) for a, b in zip(saved, live)):
            def shown(names: list[str]) -> str:
                return ", ".join(n.replace(":", ".") for n in names) or "none"

            raise IncompatibleCheckpointError(
                f"step {self.restored_step} of run {self.manager.run_name!r} holds the state of the optimizers "
                f"{shown(saved)}, and configure_optimizers now makes {shown(live)}: their state and settings "
                "(learning rate, betas, momentum) would not carry over as they were. Configure the optimizers "
                "as the fit that saved it did, or give CkptkitCheckpoint a new run_name to start afresh")

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_rng_at_epoch_end()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trained = True
        if self._pending_rng is not None and self._pending_rng.get("epoch_done"):
            # Restarted at an epoch's end before an epoch that validates, Lightning fast-forwards
            # its validation loop before the first batch, making the validation loader's iterator:
            # a seed drawn that the uninterrupted fit did not draw. That call alone gives its draws
            # back; those of fetching the first batch (a shuffling sampler's seed, a random
            # augmentation) are made as the uninterrupted fit made them.
            loop = trainer.fit_loop.epoch_loop.val_loop
            fast_forward = getattr(loop, "increment_progress_to_evaluation_end", None)
            if callable(fast_forward):
                def without_draws() -> None:
                    held = RngState().state_dict()
                    try:
                        fast_forward()
                    finally:
                        RngState().load_state_dict(held)

                loop.increment_progress_to_evaluation_end = without_draws
                self._fast_forward = (loop, fast_forward)

    def _unwrap(self) -> None:
        if self._fast_forward is not None:
            loop, _ = self._fast_forward
            with contextlib.suppress(AttributeError):
                del loop.increment_progress_to_evaluation_end  # the class's own again
            self._fast_forward = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A fit restarted after an epoch's validation finishes that epoch again (its end hooks)
        # and makes the next epoch's iterator anew, right after this: from the saved generators,
        # as the uninterrupted fit made it (a shuffling sampler's order comes from them).
        self._restore_rng_at_epoch_end()

    def _restore_rng_at_epoch_end(self) -> None:
        # Saved at an epoch's last batch: the uninterrupted fit went on to make the next epoch's
        # loader iterator (which draws a seed), and the resumed fit makes it while setting up its
        # data, after the sanity check. The generators go back before that; set again after a
        # sanity check, whose draws the uninterrupted fit made before its first step.
        if self._pending_rng is not None and self._pending_rng.get("epoch_done"):
            RngState().load_state_dict(self._pending_rng["state"])

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Saved mid-epoch: the generators go back after Lightning made the loader's iterator again
        # (which draws a seed), where the uninterrupted fit was when it saved. Saved at an
        # epoch's end, they were set before the iterator was made and drew as the uninterrupted
        # fit's did since (a validation loop's fast-forward gave its draws back).
        self._unwrap()
        if self._pending_rng is not None:
            if not self._pending_rng.get("epoch_done"):
                RngState().load_state_dict(self._pending_rng["state"])
            self._pending_rng = None
        self._save_unvalidated(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_unvalidated(trainer, pl_module)

    def _save_unvalidated(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A step left to be saved after its validation, which did not run after all (a loader
        # with no batches, known only as it ran): saved now, before anything trains further.
        deferred, self._after_validation = self._after_validation, None
        if deferred is not None and deferred[0] == trainer.global_step:
            # At the next batch's start Lightning already tells of that batch: whether the step
            # ended its epoch is what it was when the save was left for later.
            self._save(trainer, pl_module, deferred[0], force=True, epoch_done=deferred[1])

    # -- saving ---------------------------------------------------------------------------------

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step == self._last_saved or trainer.sanity_checking or trainer.fast_dev_run:
            return
        if self.manager is None or not self.manager.is_due(step):
            return
        if _validates_next(trainer):
            # The step's validation runs next: saved once it ran, the checkpoint holds its metrics
            # (what keep_best ranks) and the random draws it made (its loader's seed), which the
            # uninterrupted fit made before its next step.
            self._after_validation = (step, _epoch_done(trainer))
            return
        self._save(trainer, pl_module, step, force=False)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        deferred, self._after_validation = self._after_validation, None
        if deferred is not None and not trainer.sanity_checking and deferred[0] == trainer.global_step:
            self._save(trainer, pl_module, deferred[0], force=True, epoch_done=deferred[1])

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, force: bool,
              epoch_done: bool | None = None) -> None:
        checkpoint = _connector(trainer).dump_checkpoint(weights_only=False)
        epoch_done = _epoch_done(trainer) if epoch_done is None else epoch_done
        # The weights go through ckptkit's model state (gathered, exportable, publishable).
        checkpoint.pop("state_dict", None)
        own = {RNG_KEY: {"state": RngState().state_dict(), "epoch_done": epoch_done}}
        loaders = _loaders(checkpoint)
        if loaders is not None:
            # Rank 0's stay in the shared state too: a rank of a larger job, which saved none, gets those.
            own[LOADERS_KEY] = loaders
        stopped = self._early_stopped(trainer)
        extra = {LIGHTNING_KEY: checkpoint, OPTIMIZERS_KEY: [gather.optimizer_class(o) for o in trainer.optimizers],
                 STOPPED_KEY: stopped}
        self.manager.save(step=step, epoch=trainer.current_epoch, model=pl_module,
                          metrics=_plain_metrics(trainer.callback_metrics), extra=extra,
                          rank_extra=own, safe_globals=self.safe_globals, force=force)
        self._last_saved = step
        self._saved_stopped = stopped

    # -- the end ----------------------------------------------------------------------------------

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.manager is None:
            return
        step = trainer.global_step
        # Published first, saved second: a crash between the two trains the last steps again and
        # publishes again. Where the last step was saved already (a due one), a restart finds the
        # fit finished and publishes in teardown, unless the final backends hold the model.
        if self.finalize and self.manager.config.final is not None:
            self._finalize(pl_module, step, trainer.current_epoch, _plain_metrics(trainer.callback_metrics))
        # Saved again where early stopping ended the fit after its last save (checked at an
        # epoch's end, after the validation the save followed): the restart must see it stopped.
        if step > 0 and (step != self._last_saved or self._early_stopped(trainer) and not self._saved_stopped):
            # The end of fit is resumable too: running the finished fit again restores a finished
            # loop, which Lightning skips, so nothing is trained or published twice.
            self._save(trainer, pl_module, step, force=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._unwrap()  # a fit that ended before its first batch
            try:
                self._publish_missing(trainer, pl_module)
            finally:
                self._close()

    def _publish_missing(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A fit restored finished, whose loop Lightning skipped with its on_train_end: publish
        the final model where a job stopped inside finalize (after the last step's save) left
        it unpublished. (A fit that failed closed the manager already.)"""
        if (self.manager is None or self._trained or self.restored_step is None or not self.finalize
                or self.manager.config.final is None or not trainer.fit_loop.done):
            return
        held = self.manager.final_held(self.restored_step)
        if held:
            return
        if held is None:
            log.warning("ckptkit: the fit of run %r had finished before this start; whether every final backend holds "
                        "its final model of step %d could not be told (see the warnings above), so it is not published "
                        "again", self.manager.run_name, self.restored_step)
            return
        log.warning("ckptkit: the fit of run %r had finished before this start, but not every final backend holds "
                    "its final model of step %d (a job stopped inside finalize?): publishing it now",
                    self.manager.run_name, self.restored_step)
        self._finalize(pl_module, self.restored_step, *self._restored_as)

    def _finalize(self, pl_module: pl.LightningModule, step: int, epoch: int | None, metrics: dict[str, float]) -> None:
        params = self.params if self.params is not None else _plain_params(pl_module.hparams)
        self.manager.finalize(model=pl_module, step=step, epoch=epoch, metrics=metrics, params=params)

    def _early_stopped(self, trainer: pl.Trainer) -> bool:
        """Whether early stopping ended the fit on any rank (collective): Lightning stops every rank
        once one decides to, but says why on that rank alone, and a save taken on some ranks only
        would wait for the others until distributed.timeout_s."""
        return any(self.manager.coll.all_gather("early stopping", _early_stopped(trainer)))

    def _close(self) -> None:
        if self.manager is not None:
            manager, self.manager = self.manager, None
            manager.close()


def _early_stopped(trainer: pl.Trainer) -> bool:
    """Whether an ``EarlyStopping`` callback of ``trainer`` has stopped the fit, as this rank's state says."""
    for cb in trainer.callbacks:
        if isinstance(cb, EarlyStopping):
            reason = getattr(cb, "stopping_reason", None)
            if (getattr(reason, "value", 0) != 0) if reason is not None else cb.stopped_epoch > 0:
                return True
    return False


def _epoch_done(trainer: pl.Trainer) -> bool:
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def _validates_next(trainer: pl.Trainer) -> bool:
    """Whether Lightning validates right after this training batch (its epoch loop's own test,
    which it makes next). False where ranks could disagree: validation on a timer is decided
    by each rank's clock, and a save is collective."""
    loop = trainer.fit_loop.epoch_loop
    decide = getattr(loop, "_should_check_val_fx", None)
    if decide is None or getattr(trainer, "_val_check_time_interval", None) is not None:
        return False
    # No batches to validate: no validation hooks either. Known only once the validation loop set
    # up its data, which a fit validating every n epochs does at its first validation.
    if getattr(loop.val_loop, "_combined_loader", None) is not None and getattr(loop.val_loop, "skip", False):
        return False
    try:
        return bool(decide(trainer.fit_loop._data_fetcher))
    except (AttributeError, TypeError):  # another Lightning's loop: save at once, as before
        return False


def _loaders(checkpoint: dict[str, Any]) -> Any:
    """The data loader states in a checkpoint Lightning dumped, or None."""
    node: Any = checkpoint
    for key in _LOADERS_PATH:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _with_loaders(checkpoint: dict[str, Any], loaders: Any) -> dict[str, Any]:
    """A copy of ``checkpoint`` holding this rank's own ``loaders`` where it saved some; the
    dicts on the way are copied, so that what restore returned is left as it was."""
    out = dict(checkpoint)
    if loaders is None or _loaders(checkpoint) is None:
        return out
    node = out
    for key in _LOADERS_PATH[:-1]:
        node[key] = dict(node[key])
        node = node[key]
    node[_LOADERS_PATH[-1]] = loaders
    return out
