"""ckptkit inside the Hugging Face ``transformers`` Trainer.

The Trainer keeps writing its own checkpoint folders (``checkpoint-N/``: weights, optimizer,
scheduler, scaler, RNG states, trainer state). ``CkptkitCallback`` commits each one, as it is, to
ckptkit's resume backends (``CheckpointManager.save_files``: streamed, checksummed, manifest
last, pruned to ``keep_last``), fetches the newest committed one back before a restart
(``resume_from``), and publishes the trained model once to the final backends when training
ends. ckptkit never unpickles the Trainer's files; the Trainer loads them itself.

    ckpt = CkptkitCallback("ckptkit.yaml", run_name="exp-42")
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[ckpt])
    trainer.train(resume_from_checkpoint=ckpt.resume_from(trainer))
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Mapping

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import ExportableState
except ModuleNotFoundError as exc:  # pragma: no cover - the extra is what brings it
    if (exc.name or "").split(".")[0] != "transformers":
        raise  # installed, but broken: its own error says what
    raise ImportError("ckptkit.integrations.transformers needs Hugging Face transformers (and accelerate, for its "
                      'Trainer): pip install "ckptkit[transformers]"') from exc

from .. import ranks
from ..errors import ConfigError, IncompatibleCheckpointError
from ..manager import CheckpointManager

log = logging.getLogger(__name__)

__all__ = ["CkptkitCallback"]

# The Trainer's own names: its checkpoint folders and the file that makes a folder one of them.
CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
# The Trainer's MLflow setting that uploads every checkpoint folder to the tracking store.
LOG_ARTIFACTS = "HF_MLFLOW_LOG_ARTIFACTS"


def _latest_metrics(state: TrainerState, up_to: int | None = None) -> dict[str, float]:
    """The newest value of every number the Trainer has logged (loss, learning_rate, eval_*),
    at or before step ``up_to`` when given."""
    metrics: dict[str, float] = {}
    for entry in state.log_history:
        if up_to is not None and entry.get("step", 0) > up_to:
            continue
        for key, value in entry.items():
            if key in ("step", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                metrics[key] = float(value)
    return metrics


def _callback_states(saved: Any) -> dict[str, list[dict[str, Any]]]:
    """A checkpoint's ``stateful_callbacks`` (as ``trainer_state.json`` holds it, and the
    Trainer's state once loaded from it): class name to the states of its instances, in order."""
    if not isinstance(saved, dict):
        return {}
    return {name: [s for s in (states if isinstance(states, list) else [states]) if isinstance(s, dict)]
            for name, states in saved.items()}


def _saved_states(folder: str) -> dict[str, list[dict[str, Any]]]:
    """``_callback_states`` of the Trainer checkpoint in ``folder``."""
    try:
        with open(os.path.join(folder, TRAINER_STATE)) as f:
            return _callback_states(json.load(f).get("stateful_callbacks"))
    except (OSError, ValueError, AttributeError):
        return {}


def _stopped_early(states: dict[str, list[dict[str, Any]]]) -> bool:
    """Whether the checkpoint whose callback ``states`` these are was saved by a training that
    ``EarlyStoppingCallback`` stopped: the Trainer's stop flag set (it records it, and resets it
    when training begins again) and an early stopping's patience used up. A training stopped
    for another reason (a time budget, to be requeued) trains on when started again."""
    def arg(state: dict[str, Any], section: str, key: str) -> Any:
        return (state.get(section) or {}).get(key)

    control = states.get("TrainerControl") or [{}]
    if not arg(control[-1], "args", "should_training_stop"):
        return False
    return any(isinstance(arg(e, "attributes", "early_stopping_patience_counter"), int)
               and isinstance(arg(e, "args", "early_stopping_patience"), int)
               and arg(e, "attributes", "early_stopping_patience_counter") >= arg(e, "args", "early_stopping_patience")
               for e in states.get("EarlyStoppingCallback", ()))


def _step_of(folder: str | None) -> int | None:
    """The step of a Trainer checkpoint folder by its name (``checkpoint-12``), or None."""
    name = os.path.basename(os.path.normpath(folder)) if folder else ""
    digits = name[len(CHECKPOINT_PREFIX):] if name.startswith(CHECKPOINT_PREFIX) else ""
    return int(digits) if digits.isdigit() else None


def _save_strategy(args: TrainingArguments) -> str:
    return str(getattr(args.save_strategy, "value", args.save_strategy))


class CkptkitCallback(TrainerCallback):
    """Routes the Trainer's checkpoints through ckptkit: resume folders to the resume backends,
    the trained model once to the final backends.

    ``manager`` is a ``CheckpointManager`` or what ``CheckpointManager.from_config`` takes (a
    YAML path, a dict); one built here is closed when training ends. Each checkpoint folder the
    Trainer writes is committed, and with ``drive_saves`` the Trainer is also told to save at
    every step that ``roles.resume.every_n_steps`` makes due (set ``save_strategy="no"`` to let
    ckptkit's schedule alone decide). With ``publish_final`` and a final role in the config, the
    model is published at the end of ``train`` (its ``config`` kept beside the weights, as
    ``extra["transformers_config"]``); ``params`` are recorded with it.
    """

    def __init__(self, manager: CheckpointManager | str | os.PathLike | Mapping[str, Any],
                 run_name: str | None = None, *, drive_saves: bool = True, publish_final: bool = True,
                 params: Mapping[str, Any] | None = None):
        if isinstance(manager, CheckpointManager):
            if run_name is not None and run_name != manager.run_name:
                raise ValueError(f"run_name={run_name!r} differs from the manager's run {manager.run_name!r}; "
                                 "pass one or the other")
            self.manager, self._owned = manager, False
        else:
            self.manager, self._owned = CheckpointManager.from_config(manager, run_name=run_name), True
        self.manager.resume_role  # a Trainer checkpoint needs somewhere to go: refused before training
        self.drive_saves = drive_saves
        self.publish_final = publish_final
        self.params = dict(params or {})
        self._steps_run = 0
        self._start_step = 0
        # A restart of a training that had finished (max_steps, or stopped early): nothing more is
        # committed or published.
        self._finished = False
        # Such a restart whose final model no final backend holds (a job stopped inside
        # finalize): published at the end, once the Trainer has loaded the best model back.
        self._unpublished = False
        # Whether resume_from gave the Trainer's callbacks their saved state back.
        self._callbacks_restored = False
        # The step last committed and its trainer_state.json, to tell a folder saved again
        # unchanged (rank 0's: it decides for every rank).
        self._committed: tuple[int, bytes] | None = None

    # -- resuming ---------------------------------------------------------------------------

    def resume_from(self, where: Any) -> str | None:
        """Fetch the newest committed Trainer checkpoint into the output folder; its path, or None.

        ``where`` is the Trainer, its ``TrainingArguments`` or the output folder. The checkpoint
        is taken from whichever resume backend holds the newest intact one (an S3 copy when the
        local disk is gone), verified, and put at ``<output_dir>/checkpoint-<step>`` (kept as it
        is when that folder already matches). Pass the result to
        ``trainer.train(resume_from_checkpoint=...)``; None starts from scratch.
        """
        self._reopen()
        output_dir = getattr(getattr(where, "args", where), "output_dir", where)
        if not isinstance(output_dir, (str, os.PathLike)):
            raise TypeError(f"resume_from takes a Trainer, TrainingArguments or a folder, got {type(where).__name__}")
        info = self.manager.restore_files(os.path.join(os.fspath(output_dir), CHECKPOINT_PREFIX + "{step}"))
        if info is None:
            return None
        if TRAINER_STATE not in info.manifest.files:
            raise IncompatibleCheckpointError(
                f"{info.ref.uri} holds no {TRAINER_STATE}: it was not written by a transformers Trainer "
                f"(it holds {', '.join(sorted(info.manifest.files))}); resume it with the code that saved it, "
                "or give this training another run name")
        path = os.path.join(os.fspath(output_dir), f"{CHECKPOINT_PREFIX}{info.step}")
        log.info("resuming the Trainer from step %d of %s (fetched into %s)", info.step, info.ref.uri, path)
        self._callbacks_restored = False
        handler = getattr(where, "callback_handler", None)
        args = getattr(where, "args", None)
        if handler is not None and isinstance(args, TrainingArguments) and \
                not args.restore_callback_states_from_checkpoint:
            self._restore_callbacks(handler.callbacks, _saved_states(path))
        return path

    def _reopen(self) -> None:
        # The manager built here is closed as training ends; a second train() (or resume_from) on
        # the same callback gets a new one of the same config and run.
        if self._owned and self.manager._closed:
            self.manager = CheckpointManager.from_config(self.manager.config, run_name=self.manager.run_name)

    def _restore_callbacks(self, callbacks: list[Any], states: dict[str, list[dict[str, Any]]]) -> None:
        """Give the Trainer's callbacks the state they saved (``EarlyStoppingCallback``'s
        patience counter), in place: by default the Trainer leaves it unread, and a resumed
        training ran past the step where the uninterrupted one stopped. Its own restore
        (``restore_callback_states_from_checkpoint``) builds each callback anew from its saved
        arguments, which fails for one that takes others, and moves it to the end of the list."""
        for name, saved in states.items():
            if name == "TrainerControl":
                continue
            live = [cb for cb in callbacks if type(cb).__name__ == name and isinstance(cb, ExportableState)]
            for cb, state in zip(live, saved):
                for attribute, value in (state.get("attributes") or {}).items():
                    setattr(cb, attribute, value)
        self._callbacks_restored = True

    # -- the Trainer's events ---------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._refuse_save_best(args)  # as Trainer(...) is built, before resume_from fetches anything
        return control

    def _refuse_save_best(self, args: TrainingArguments) -> None:
        if self.drive_saves and _save_strategy(args) == "best":
            # The Trainer sets should_save to "is this evaluation the best yet" after its
            # evaluation, over the save ckptkit's schedule asked for at that step.
            raise ConfigError('save_strategy="best" lets the Trainer cancel, at every evaluation that is '
                              "not the best yet, the saves roles.resume.every_n_steps asks for; use "
                              'save_strategy="no" and roles.resume.keep_best (metric: eval_loss) to keep the best '
                              "checkpoint, or CkptkitCallback(drive_saves=False) to let the Trainer decide alone")

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        # Starts the tracking run's lookup now, while the Trainer's own MLflow run (report_to)
        # is active on this thread, so that the final model is logged to that run.
        self._reopen()
        self._steps_run, self._finished, self._committed, self._unpublished = 0, False, None, False
        self._refuse_save_best(args)
        self.manager.tracking_run_id()
        self._start_step = state.global_step
        if state.global_step > 0:
            # The state the Trainer loaded from the checkpoint it resumes (however it was given).
            saved = _callback_states(state.stateful_callbacks)
            stopped = _stopped_early(saved)
            self._finished = state.global_step >= state.max_steps or stopped
            if stopped:
                # The Trainer resets its stop flag as training begins; the loop ends after one step.
                control.should_training_stop = True
                log.info("step %d was saved by a training told to stop (early stopping): it stops again, and "
                         "nothing more is committed or published", state.global_step)
            if self._finished:
                self._publish_missing(args, state, kwargs.get("model"))
            exported = sorted(name for name in saved if name != "TrainerControl")
            if exported and not args.restore_callback_states_from_checkpoint and not self._callbacks_restored:
                log.warning("the checkpoint holds the state of %s, which the Trainer does not restore: pass the "
                            "Trainer to resume_from (or set restore_callback_states_from_checkpoint=True) for a "
                            "resume that goes on as the training that saved it would have", ", ".join(exported))
        if args.save_only_model:
            log.warning("save_only_model=True: the Trainer's checkpoints hold no optimizer, scheduler or random "
                        "state, so a resumed training starts those afresh and does not go on as it would have")
        if "mlflow" in (args.report_to or []) and os.environ.get(LOG_ARTIFACTS, "").upper() in ("1", "TRUE", "ON", "YES"):
            log.warning("%s is set: the Trainer's MLflow callback uploads every checkpoint folder to the tracking "
                        "store as well, beside the copies ckptkit keeps and prunes; unset it (ckptkit publishes "
                        "the final model there once)", LOG_ARTIFACTS)
        return control

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._steps_run += 1
        # The last step too: a finished training started again then resumes at its end, and
        # neither trains its last steps again nor publishes a second time. The Trainer's own
        # "steps" and "epoch" strategies save the end themselves; asking again would write and
        # commit it twice.
        last = state.global_step >= state.max_steps > self._start_step and _save_strategy(args) == "no"
        if self._finished:
            control.should_save = False  # the step a finished training still runs is not kept
        elif self.drive_saves and (self.manager.is_due(state.global_step) or last):
            control.should_save = True
        return control

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        # An evaluation that stops training (EarlyStoppingCallback, when it runs before this one):
        # that step is saved, so that a restart finds the training finished rather than trains
        # up to the stop again.
        if self.drive_saves and control.should_training_stop and not self._finished and _save_strategy(args) != "best":
            control.should_save = True
        return control

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        folder = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}{state.global_step}")
        saved = None
        if ranks.rank() == 0:  # save_files reads the folder on rank 0, the one node sure to hold it
            try:
                with open(os.path.join(folder, TRAINER_STATE), "rb") as f:
                    saved = (state.global_step, f.read())
            except OSError:
                pass
        # The same folder saved again with nothing new (transformers before 4.50 saves the last
        # step twice under save_strategy="epoch") is committed once. Rank 0 decides for all, as
        # save_files is collective.
        if self.manager.coll.share(f"on_save step {state.global_step}: saved again",
                                   saved is not None and saved == self._committed):
            return control
        refs = self.manager.save_files(step=state.global_step, files=folder, epoch=int(state.epoch or 0),
                                       metrics=_latest_metrics(state), force=True)
        self._committed = saved if refs else None  # with on_error="warn", a failed save is tried again
        return control

    def _published_as(self, args: TrainingArguments, state: TrainerState) -> tuple[int, int, dict[str, float]]:
        """The step, epoch and metrics of the model the Trainer ends with: with
        ``load_best_model_at_end``, the best checkpoint's, which the Trainer loaded back (when its
        folder was still there), else the last step's. Rank 0's answer on every rank
        (collective): whether the folder is there is asked of rank 0's disk."""
        best = state.best_model_checkpoint if args.load_best_model_at_end else None
        step = _step_of(best) if best and os.path.isdir(best) else None
        if step is None:
            found = state.global_step, int(state.epoch or 0), _latest_metrics(state)
        else:
            epochs = [e["epoch"] for e in state.log_history if e.get("step") == step and "epoch" in e]
            found = step, int(epochs[-1]) if epochs else int(state.epoch or 0), _latest_metrics(state, up_to=step)
        return self.manager.coll.share("the Trainer's final model", found)

    def _publish_missing(self, args: TrainingArguments, state: TrainerState, model: Any) -> None:
        """At the start of a finished training: publish its final model where a job stopped
        inside finalize left it unpublished, from the weights just restored (the step the
        Trainer may still run is not the model's), or, when the Trainer loads the best
        checkpoint back at the end, then."""
        if not self.publish_final or self.manager.config.final is None:
            return
        # The step the first end published: the best checkpoint's, whether or not its folder is
        # here (resume_from fetches the newest only, and the Trainer then forgets the folder's
        # name, though not its step).
        best = None
        if args.load_best_model_at_end:
            best = getattr(state, "best_global_step", None) or _step_of(state.best_model_checkpoint)
        step = best if best is not None else state.global_step
        held = self.manager.final_held(step)
        if held:
            log.info("training had finished (max_steps %d, or stopped early) before this start, and its final model "
                     "is published: it is not published again", state.max_steps)
            return
        if held is None:
            log.warning("training had finished (max_steps %d, or stopped early) before this start; whether every final "
                        "backend holds its final model of step %d could not be told (see the warnings above), so it "
                        "is not published again", state.max_steps, step)
            return
        if step != state.global_step and self._published_as(args, state)[0] != step:
            log.warning("training had finished before this start, but not every final backend holds its final model "
                        "of step %d (a job stopped inside finalize?), and that checkpoint's folder is not here to "
                        "publish it from: copy that checkpoint's folder (%s lists where step %d is) into the output "
                        "folder as %s%d and run again", step, self.manager._command("ls"), step, CHECKPOINT_PREFIX, step)
            return
        log.warning("training had finished (max_steps %d, or stopped early) before this start, but not every final "
                    "backend holds its final model of step %d (a job stopped inside finalize?): publishing it now",
                    state.max_steps, step)
        if step == state.global_step:
            self._finalize(args, state, model)
        else:
            self._unpublished = True

    def _finalize(self, args: TrainingArguments, state: TrainerState, model: Any) -> None:
        if model is None:
            raise ValueError("the Trainer passed no model to the callback; nothing to publish")
        config = getattr(model, "config", None)
        extra = {"transformers_config": config.to_json_string()} if hasattr(config, "to_json_string") else {}
        step, epoch, metrics = self._published_as(args, state)
        self.manager.finalize(model=model, step=step, epoch=epoch, metrics=metrics, extra=extra, params=self.params)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: Any = None, **kwargs: Any):
        try:
            if self.publish_final and self.manager.config.final is not None:
                if (self._steps_run == 0 or self._finished) and not self._unpublished:
                    pass  # a restart of a finished training: published already, or at its start
                else:
                    self._finalize(args, state, model)
            else:
                self.manager.wait()
        finally:
            self._callbacks_restored = False  # a later train() is told again unless resume_from restores them
            if self._owned:
                self.manager.close()
        return control
