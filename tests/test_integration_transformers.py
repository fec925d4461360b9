"""The Hugging Face Trainer with ckptkit's callback, for real: a tiny GPT-2 built from its config on
the CPU, killed and resumed, on local disk and on S3 (moto), with an embedded MLflow store.

Run as a script (``python this_file.py CONFIG OUT KILL_AT``) it is the training that SIGKILLs
itself, the way a preempted job dies.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckptkit.errors import ConfigError

MAX_STEPS = 12
EVERY = 4
KILL_AT = 6  # after the save of step 4, before the one of step 8


def tiny_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # Dropout stays on, so that a resume that lost the RNG state would show in the weights.
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    return GPT2LMHeadModel(config)


def dataset():
    g = torch.Generator().manual_seed(1)
    # 10 batches an epoch: MAX_STEPS ends inside the second epoch, where a Trainer resumed at its
    # last step trains one more (transformers' own behaviour).
    ids = torch.randint(0, 64, (40, 16), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def trainer_for(config, out_dir, extra_callbacks=(), report_to=()):
    from transformers import Trainer, TrainingArguments

    from ckptkit.integrations.transformers import CkptkitCallback

    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=MAX_STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        save_strategy="no", logging_steps=2, report_to=list(report_to), seed=7, use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    callback = CkptkitCallback(config, run_name="hf")
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=dataset(),
                      callbacks=[callback, *extra_callbacks])
    return trainer, callback


def train(config, out_dir, extra_callbacks=(), report_to=()):
    """One training as a user writes it: resume from whatever ckptkit holds, then train."""
    trainer, callback = trainer_for(config, out_dir, extra_callbacks, report_to)
    resumed = callback.resume_from(trainer)
    trainer.train(resume_from_checkpoint=resumed)
    return trainer, resumed


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def local_config(tmp_path, keep_last=2, final=None):
    config = {
        "backends": {"scratch": {"type": "local", "path": str(tmp_path / "ckpts")}},
        "roles": {"resume": {"backends": ["scratch"], "every_n_steps": EVERY, "keep_last": keep_last}},
    }
    if final is not None:
        config["backends"]["registry"] = final
        config["roles"]["final"] = {"backends": ["registry"]}
    return config


def run_killed(tmp_path, config, out_dir):
    """The training in a child process that SIGKILLs itself after step KILL_AT."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, __file__, str(path), str(out_dir), str(KILL_AT)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The weights of a training that nobody stopped, with the same seeds and data."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    trainer, _ = train(local_config(tmp), tmp / "out")
    return weights(trainer.model)


def assert_same(model, expected):
    got = weights(model)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def steps(root):
    return sorted(int(d.name.split("-")[1]) for d in root.iterdir() if d.name.startswith("step-"))


def test_killed_training_resumes_bit_identical_from_local_disk(tmp_path, uninterrupted):
    config = local_config(tmp_path)
    out = tmp_path / "out"
    run_killed(tmp_path, config, out)
    assert steps(tmp_path / "ckpts" / "hf") == [4]

    counted = step_counter()
    trainer, resumed = train(config, out, extra_callbacks=[counted])

    assert resumed == str(out / "checkpoint-4")
    assert counted.steps == MAX_STEPS - 4  # it went on from step 4, not from scratch
    assert trainer.state.global_step == MAX_STEPS
    assert_same(trainer.model, uninterrupted)
    # keep_last: 2 of the saves at 4, 8 and 12.
    assert steps(tmp_path / "ckpts" / "hf") == [8, 12]
    manifest = json.loads((tmp_path / "ckpts" / "hf" / "step-0000000012" / "manifest.json").read_text())
    assert manifest["format"] == "files"
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json"} <= set(manifest["files"])


def test_resume_fetches_the_s3_copy_when_the_local_disk_is_gone(tmp_path, uninterrupted, s3):
    config = {
        "backends": {"archive": {"type": "s3", "path": f"s3://{s3['bucket']}/ckpts",
                                 "storage_options": {"endpoint_url": s3["endpoint"]}}},
        "roles": {"resume": {"backends": ["archive"], "every_n_steps": EVERY, "keep_last": 1}},
    }
    out = tmp_path / "out"
    run_killed(tmp_path, config, out)
    shutil.rmtree(out)  # the machine is gone; only S3 holds the checkpoint

    trainer, resumed = train(config, out)

    assert resumed == str(out / "checkpoint-4")
    assert trainer.state.global_step == MAX_STEPS
    assert_same(trainer.model, uninterrupted)
    fs = s3["fs"]
    fs.invalidate_cache()
    held = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{s3['bucket']}/ckpts/hf", refresh=True))
    assert held == ["step-0000000012"]  # keep_last: 1


def test_a_damaged_newest_copy_is_skipped_for_the_older_one(tmp_path):
    """A damaged file in the newest checkpoint: the Trainer resumes from the one before."""
    from ckptkit.integrations.transformers import CkptkitCallback

    config = local_config(tmp_path)
    out = tmp_path / "out"
    train(config, out)
    root = tmp_path / "ckpts" / "hf"
    assert steps(root) == [8, 12]
    with open(root / "step-0000000012" / "optimizer.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    shutil.rmtree(out)
    callback = CkptkitCallback(config, run_name="hf")
    with pytest.warns(RuntimeWarning, match="step-0000000012.*optimizer.pt"):
        path = callback.resume_from(out)
    assert path == str(out / "checkpoint-8")
    assert json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["global_step"] == 8
    assert not (out / "checkpoint-12").exists()
    with pytest.raises(ValueError, match="run_name='other' differs"):
        CkptkitCallback(callback.manager, run_name="other")
    callback.manager.close()


def test_mlflow_holds_one_model_and_no_checkpoint(tmp_path):
    """The tracking store gets the final model once; every resume checkpoint stays out of it
    (a restart after the end publishing nothing again: the docs example's test)."""
    import mlflow

    db = tmp_path / "mlflow" / "mlflow.db"
    db.parent.mkdir()
    final = {"type": "mlflow", "tracking_uri": f"sqlite:///{db}", "experiment": "hf",
             "registered_model_name": "tiny-gpt2"}
    config = local_config(tmp_path, final=final)
    trainer, _ = train(config, tmp_path / "out")

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    versions = client.search_model_versions("name='tiny-gpt2'")
    assert [str(v.version) for v in versions] == ["1"]
    artifacts = [p for p in (tmp_path / "mlflow").rglob("*") if p.is_file() and p.name != "mlflow.db"]
    assert [p.name for p in artifacts] == ["final_model.pt"]
    assert steps(tmp_path / "ckpts" / "hf") == [8, 12]
    saved = torch.load(artifacts[0], weights_only=True)
    assert saved["step"] == MAX_STEPS
    assert json.loads(saved["extra"]["transformers_config"])["n_embd"] == 16
    assert_same(trainer.model, saved["model"])


def test_hf_mlflow_log_artifacts_is_called_out(tmp_path, monkeypatch, caplog):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from ckptkit.integrations.transformers import CkptkitCallback

    monkeypatch.setenv("HF_MLFLOW_LOG_ARTIFACTS", "1")
    callback = CkptkitCallback(local_config(tmp_path), run_name="hf")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=["mlflow"], use_cpu=True)
    with caplog.at_level("WARNING", logger="ckptkit"):
        callback.on_train_begin(args, TrainerState(), TrainerControl())
    assert "HF_MLFLOW_LOG_ARTIFACTS is set" in caplog.text
    callback.manager.close()


def test_save_files_takes_flat_folders_and_restore_refuses_them(tmp_path):
    """The core calls under the callback: what save_files refuses, and restore() sending a
    folder of files to restore_files instead of loading it."""
    from ckptkit import CheckpointManager
    from ckptkit.errors import IncompatibleCheckpointError

    ck = CheckpointManager.from_config(local_config(tmp_path), run_name="files")
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"w" * 1000)
    with pytest.raises(ValueError, match="holds the folder 'sub'"):
        ck.save_files(4, folder)
    (folder / "sub").rmdir()
    (folder / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="manifest.json, the name of ckptkit's own manifest"):
        ck.save_files(4, folder)
    assert ck.save_files(4, [folder / "weights.bin"])[0].sizes == {"weights.bin": 1000}
    assert ck.save_files(5, [folder / "weights.bin"]) == []  # not due
    with pytest.raises(IncompatibleCheckpointError, match="restore_files"):
        ck.restore(torch.nn.Linear(2, 2))
    with pytest.raises(IncompatibleCheckpointError, match="restore_files"):
        ck.export(tmp_path / "model.pt")
    assert ck.peek().step == 4
    info = ck.restore_files(tmp_path / "back" / "{step}")
    assert (info.step, (tmp_path / "back" / "4" / "weights.bin").read_bytes()) == (4, b"w" * 1000)
    ck.close()


def test_the_docs_example_runs_and_resumes(tmp_path, monkeypatch):
    """The example of docs/integrations.md, run twice as a user would: the second run resumes
    at the end, where the Trainer runs one more step (24 steps end inside an epoch), and
    publishes nothing again."""
    import mlflow

    text = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    section = text[text.index("## Hugging Face Transformers"):]
    code = section[section.index("```python\n") + len("```python\n"):]
    code = code[:code.index("```")]
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        exec(compile(code, "docs/integrations.md", "exec"), {"__name__": "docs_example"})
    assert steps(tmp_path / "checkpoints" / "tiny-gpt2") == [16, 24]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [str(v.version) for v in client.search_model_versions("name='tiny-gpt2'")] == ["1"]


@pytest.fixture(scope="module")
def s3_server():
    from trust.common import free_port, wait_for_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 60, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3(s3_server, monkeypatch):
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    fs.mkdir("hf-ckpts")
    return {"endpoint": s3_server, "bucket": "hf-ckpts", "fs": fs}


def step_counter():
    """A callback that counts the steps this process trained."""
    from transformers import TrainerCallback

    class Counter(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

    return Counter()


def kill_at(step):
    """A callback that SIGKILLs the process at the end of ``step``: no cleanup, no flush."""
    from transformers import TrainerCallback

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                os.kill(os.getpid(), signal.SIGKILL)

    return KillAt()


if __name__ == "__main__":
    config_path, out_dir, step = sys.argv[1:]
    train(json.loads(open(config_path).read()), out_dir, extra_callbacks=[kill_at(int(step))])


def test_the_last_step_is_committed_so_a_finished_training_run_again_trains_and_publishes_nothing(tmp_path):
    """With max_steps no multiple of every_n_steps, the last steps were never committed: run
    again, the training resumed before its end, trained them again and published a second time."""
    config = local_config(tmp_path, final={"type": "local", "path": str(tmp_path / "final")})
    config["roles"]["resume"]["every_n_steps"] = 5
    train(config, tmp_path / "out")
    assert steps(tmp_path / "ckpts" / "hf") == [10, 12]
    published = tmp_path / "final" / "hf" / "final" / "manifest.json"
    first = published.read_bytes()

    _, resumed = train(config, tmp_path / "out")
    assert resumed.endswith("checkpoint-12")
    assert published.read_bytes() == first


def test_a_finished_training_whose_final_model_no_backend_holds_publishes_it_when_run_again(tmp_path, caplog):
    """A job stopped inside finalize, after its last step was committed: every restart found the
    training finished and published nothing, without a word; ckptkit publish could not either
    (a files checkpoint holds no state.pt). A first training without a final role leaves the
    run so; the restart publishes the restored weights of the last step."""
    train(local_config(tmp_path), tmp_path / "out")
    assert steps(tmp_path / "ckpts" / "hf") == [8, 12]
    config = local_config(tmp_path, final={"type": "local", "path": str(tmp_path / "final")})
    with caplog.at_level(logging.WARNING, logger="ckptkit.integrations.transformers"):
        trainer, resumed = train(config, tmp_path / "out")
    assert resumed.endswith("checkpoint-12")
    assert "not every final backend holds its final model of step 12" in caplog.text
    published = torch.load(tmp_path / "final" / "hf" / "final" / "final_model.pt", weights_only=True)
    from safetensors.torch import load_file

    saved = load_file(os.path.join(resumed, "model.safetensors"))
    assert published["step"] == 12
    assert all(torch.equal(published["model"][k], saved[k]) for k in saved), "not the last step's weights"
    first = (tmp_path / "final" / "hf" / "final" / "manifest.json").read_bytes()

    train(config, tmp_path / "out")  # published now: not again
    assert sorted(os.listdir(tmp_path / "final" / "hf")) == ["final"]
    assert (tmp_path / "final" / "hf" / "final" / "manifest.json").read_bytes() == first


def early_stopping_training(config, out_dir, stop_at=None, save_steps=EVERY, early_first=False, best_is_first=False,
                            resume=None):
    """A training that EarlyStoppingCallback stops at step 12: evaluated every 4 steps, no
    evaluation counts as better (the threshold), so after the first the patience of 2 runs out.
    ``stop_at``: the process dies (an exception) at the end of that step instead. ``early_first``:
    EarlyStoppingCallback comes before ckptkit's in the callbacks. ``best_is_first``: the highest
    evaluation loss counts as best, which is the first evaluation's as the loss goes down.
    ``resume``: a checkpoint folder given to ``train`` as it is, without ``resume_from``."""
    from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments

    from ckptkit.integrations.transformers import CkptkitCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == stop_at:
                raise KeyboardInterrupt(f"killed at step {stop_at}")

    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=40, per_device_train_batch_size=4, learning_rate=1e-2,
        eval_strategy="steps", eval_steps=EVERY, save_strategy="steps", save_steps=save_steps, logging_steps=2,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=best_is_first,
        report_to=[], seed=7, use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    callback = CkptkitCallback(config, run_name="hf")
    early = EarlyStoppingCallback(early_stopping_patience=2, early_stopping_threshold=100.0)
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=dataset(), eval_dataset=dataset()[:8],
                      callbacks=[early, callback, Crash()] if early_first else [callback, early, Crash()])
    resumed = callback.resume_from(trainer) if resume is None else str(resume)
    try:
        trainer.train(resume_from_checkpoint=resumed)
    except KeyboardInterrupt:
        callback.manager.close()
    return trainer, resumed


def test_early_stopping_resumes_with_its_patience_and_a_stopped_training_stays_stopped(tmp_path, caplog):
    """The Trainer leaves callbacks' saved state unread by default: resumed at step 8, the
    patience counter started again from 0 and the training ran to step 16, not 12. Started again
    once stopped, it trained on to the next stop and published a second model. With
    load_best_model_at_end, the model published is the best checkpoint's, and says so."""
    final = {"type": "local", "path": str(tmp_path / "whole" / "final")}
    whole, _ = early_stopping_training(local_config(tmp_path / "whole", final=final), tmp_path / "whole" / "out",
                                       best_is_first=True)
    assert whole.state.global_step == 12

    config = local_config(tmp_path, final={"type": "local", "path": str(tmp_path / "final")})
    early_stopping_training(config, tmp_path / "out", stop_at=10, best_is_first=True)
    assert steps(tmp_path / "ckpts" / "hf") == [4, 8]
    trainer, resumed = early_stopping_training(config, tmp_path / "out", best_is_first=True)
    assert resumed.endswith("checkpoint-8")
    assert trainer.state.global_step == 12
    last = "checkpoint-12/model.safetensors"
    assert (tmp_path / "out" / last).read_bytes() == (tmp_path / "whole" / "out" / last).read_bytes()
    assert_same(trainer.model, weights(whole.model))
    assert steps(tmp_path / "ckpts" / "hf") == [8, 12]

    published = tmp_path / "final" / "hf" / "final"
    best = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[1])
    assert best < trainer.state.global_step  # an earlier step than the last, so the label tells them apart
    manifest = json.loads((published / "manifest.json").read_text())
    assert manifest["step"] == best
    assert manifest["metrics"]["eval_loss"] == trainer.state.best_metric
    saved = torch.load(published / "final_model.pt", weights_only=True)
    assert saved["step"] == best
    assert_same(trainer.model, saved["model"])  # the best checkpoint's weights, loaded back at the end
    first = (published / "manifest.json").read_bytes()

    # Saving every step now: the one step the stopped training still runs is not kept.
    config["roles"]["resume"]["every_n_steps"] = 1
    again, resumed = early_stopping_training(config, tmp_path / "out", best_is_first=True)
    assert resumed.endswith("checkpoint-12")
    assert again.state.global_step <= 13  # the Trainer runs one step before it looks at its stop flag
    assert steps(tmp_path / "ckpts" / "hf") == [8, 12]
    assert not (tmp_path / "out" / "checkpoint-13").exists()
    assert (published / "manifest.json").read_bytes() == first

    # On another machine (resume_from fetches the newest checkpoint only, not the best one's
    # folder): the best step's final model is held, so nothing is published, the last step's
    # weights least of all.
    shutil.rmtree(tmp_path / "out")
    early_stopping_training(config, tmp_path / "out", best_is_first=True)
    assert sorted(os.listdir(tmp_path / "final" / "hf")) == ["final"]
    assert (published / "manifest.json").read_bytes() == first

    # The same, its final model never published (stopped inside finalize): the best step's
    # folder is not here to publish from, and the warning says how to bring it (it advised a
    # restore_files(step=) that does not exist).
    shutil.rmtree(tmp_path / "out")
    shutil.rmtree(published)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ckptkit"):
        early_stopping_training(config, tmp_path / "out", best_is_first=True)
    told = [r.getMessage() for r in caplog.records if "is not here to publish it from" in r.getMessage()]
    assert len(told) == 1 and "restore_files" not in told[0], told
    assert f"(ckptkit ls <your config file> --run-name hf lists where step {best} is)" in told[0]
    assert f"into the output folder as checkpoint-{best} and run again" in told[0]
    assert not published.exists()


def test_the_step_where_early_stopping_stops_is_committed_though_no_save_was_due(tmp_path):
    """Evaluated every 4 steps and saved every 8, the training stopped at step 12, committed last
    at 8: started again, it trained up to the stop once more and published a second model."""
    config = local_config(tmp_path, final={"type": "local", "path": str(tmp_path / "final")})
    config["roles"]["resume"]["every_n_steps"] = 8
    trainer, _ = early_stopping_training(config, tmp_path / "out", save_steps=8, early_first=True)
    assert trainer.state.global_step == 12
    assert_stays_stopped(config, tmp_path)


def assert_stays_stopped(config, tmp_path):
    """Committed at 12, where early stopping stopped it, the training started again runs its one
    step, and publishes nothing again."""
    assert steps(tmp_path / "ckpts" / "hf") == [8, 12]
    first = (tmp_path / "final" / "hf" / "final" / "manifest.json").read_bytes()
    again, resumed = early_stopping_training(config, tmp_path / "out", save_steps=8, early_first=True)
    assert resumed.endswith("checkpoint-12") and again.state.global_step <= 13
    assert (tmp_path / "final" / "hf" / "final" / "manifest.json").read_bytes() == first


def test_a_stopped_training_given_to_train_without_resume_from_stays_stopped_too(tmp_path):
    """Told finished from what resume_from read, a training resumed by the Trainer's own
    resume_from_checkpoint=path trained on to the next stop and published a second model."""
    config = local_config(tmp_path, final={"type": "local", "path": str(tmp_path / "final")})
    early_stopping_training(config, tmp_path / "out")
    first = (tmp_path / "final" / "hf" / "final" / "manifest.json").read_bytes()
    again, _ = early_stopping_training(config, tmp_path / "out", resume=tmp_path / "out" / "checkpoint-12")
    assert again.state.global_step <= 13
    assert (tmp_path / "final" / "hf" / "final" / "manifest.json").read_bytes() == first
    assert sorted(os.listdir(tmp_path / "final" / "hf")) == ["final"], "its own final model is not published twice"
    assert steps(tmp_path / "ckpts" / "hf") == [8, 12]


def test_a_resumed_training_still_commits_the_step_where_early_stopping_stops(tmp_path):
    """The Trainer's own restore of callback states builds EarlyStoppingCallback anew and puts
    it last, after ckptkit's, whose on_evaluate then never saw the stop: from the first resume on,
    the stop step went uncommitted and a restart trained up to it and published again."""
    config = local_config(tmp_path, final={"type": "local", "path": str(tmp_path / "final")})
    config["roles"]["resume"]["every_n_steps"] = 8
    early_stopping_training(config, tmp_path / "out", stop_at=9, save_steps=8, early_first=True)
    assert steps(tmp_path / "ckpts" / "hf") == [8]
    trainer, resumed = early_stopping_training(config, tmp_path / "out", save_steps=8, early_first=True)
    assert resumed.endswith("checkpoint-8") and trainer.state.global_step == 12
    assert_stays_stopped(config, tmp_path)


def test_a_training_stopped_for_another_reason_trains_on_when_started_again(tmp_path):
    """Only early stopping keeps a restarted training stopped: one that stopped itself at a
    saved step (a time budget before a requeue) goes on to max_steps."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 8:
                control.should_training_stop = True

    config = local_config(tmp_path)
    trainer, _ = train(config, tmp_path / "out", extra_callbacks=[StopAt()])
    assert trainer.state.global_step == 8 and steps(tmp_path / "ckpts" / "hf") == [4, 8]
    trainer, resumed = train(config, tmp_path / "out")
    assert resumed.endswith("checkpoint-8") and trainer.state.global_step == MAX_STEPS
    assert steps(tmp_path / "ckpts" / "hf") == [8, 12]


def test_save_strategy_best_is_refused_before_a_step_as_it_cancels_the_scheduled_saves(tmp_path):
    """The Trainer sets should_save to "best yet?" after each evaluation, over the save ckptkit
    asked for: with evaluations at the due steps, only the first was ever committed."""
    from transformers import Trainer, TrainingArguments

    from ckptkit.integrations.transformers import CkptkitCallback

    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=MAX_STEPS, per_device_train_batch_size=4,
                             save_strategy="best", eval_strategy="steps", eval_steps=EVERY,
                             metric_for_best_model="eval_loss", report_to=[], use_cpu=True, disable_tqdm=True)
    callback = CkptkitCallback(local_config(tmp_path), run_name="hf")
    with pytest.raises(ConfigError, match=r'save_strategy="best" lets the Trainer cancel.*keep_best'):
        Trainer(model=tiny_model(), args=args, train_dataset=dataset(), eval_dataset=dataset()[:4],
                callbacks=[callback])
    # A callback added to a Trainer already built is refused as training starts.
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=dataset(), eval_dataset=dataset()[:4])
    trainer.add_callback(callback)
    with pytest.raises(ConfigError, match=r'save_strategy="best"'):
        trainer.train()
    assert not (tmp_path / "ckpts").exists() or steps(tmp_path / "ckpts" / "hf") == []


def test_with_the_trainers_own_epoch_strategy_the_last_step_is_committed_once(tmp_path, monkeypatch):
    """The Trainer saves the end itself with save_strategy="epoch": asking for it as well wrote
    and committed the last checkpoint twice."""
    from transformers import Trainer, TrainingArguments

    from ckptkit import CheckpointManager
    from ckptkit.integrations.transformers import CkptkitCallback

    committed = []
    save_files = CheckpointManager.save_files
    monkeypatch.setattr(CheckpointManager, "save_files",
                        lambda self, **kw: committed.append(kw["step"]) or save_files(self, **kw))
    config = local_config(tmp_path)
    config["roles"]["resume"]["every_n_steps"] = 3
    args = TrainingArguments(output_dir=str(tmp_path / "out"), num_train_epochs=2, per_device_train_batch_size=4,
                             save_strategy="epoch", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=dataset(),
                      callbacks=[CkptkitCallback(config, run_name="hf")])
    trainer.train()
    assert committed == [3, 6, 9, 10, 12, 15, 18, 20]


def test_the_same_trainer_and_callback_train_again_after_training_ended(tmp_path):
    """The callback closes the manager it built as training ends: resume_from on it then raised
    "the checkpoint manager ... is closed; build a new one" (the user built none), and a second
    train() trained its steps and failed at the first save."""
    config = local_config(tmp_path, final={"type": "local", "path": str(tmp_path / "final")})
    trainer, callback = trainer_for(config, tmp_path / "out")
    trainer.train()
    assert steps(tmp_path / "ckpts" / "hf") == [MAX_STEPS - EVERY, MAX_STEPS]
    resumed = callback.resume_from(trainer)
    assert resumed is not None and resumed.endswith(f"checkpoint-{MAX_STEPS}")
    trainer.args.max_steps = MAX_STEPS + EVERY
    trainer.train(resume_from_checkpoint=resumed)
    assert steps(tmp_path / "ckpts" / "hf") == [MAX_STEPS, MAX_STEPS + EVERY]
    # The second training's final model goes beside the first one's, which keeps its bytes.
    first = torch.load(tmp_path / "final" / "hf" / "final" / "final_model.pt", weights_only=True)
    published = torch.load(tmp_path / "final" / "hf" / "final-2" / "final_model.pt", weights_only=True)
    assert (first["step"], published["step"]) == (MAX_STEPS, MAX_STEPS + EVERY)


def test_a_later_train_without_resume_from_is_told_again_of_callback_state_left_unread(tmp_path, caplog):
    """resume_from's mark that it gave the callbacks their state back outlived the training it
    was for: a later train() on the same callback, resumed by path alone, was told nothing."""
    from transformers import EarlyStoppingCallback, Trainer, TrainingArguments

    from ckptkit.integrations.transformers import CkptkitCallback

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=40, per_device_train_batch_size=4, learning_rate=1e-2,
        eval_strategy="steps", eval_steps=EVERY, save_strategy="steps", save_steps=EVERY, logging_steps=2,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", report_to=[], seed=7, use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    callback = CkptkitCallback(local_config(tmp_path), run_name="hf")
    early = EarlyStoppingCallback(early_stopping_patience=2, early_stopping_threshold=100.0)
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=dataset(), eval_dataset=dataset()[:8],
                      callbacks=[callback, early])
    trainer.train()
    unread = "which the Trainer does not restore"
    with caplog.at_level(logging.WARNING, logger="ckptkit.integrations.transformers"):
        path = callback.resume_from(trainer)
        trainer.train(resume_from_checkpoint=path)
        assert unread not in caplog.text  # resume_from gave them back
        trainer.train(resume_from_checkpoint=path)
    assert caplog.text.count(unread) == 1, caplog.text


@pytest.mark.distributed
def test_a_folder_saved_again_is_skipped_on_every_rank_as_rank_0_decides(tmp_path):
    """The ranks of two nodes: only rank 0's node holds the checkpoint folder. Rank 1 must skip
    the second save of the same folder with rank 0, not enter save_files alone."""
    from ckpt_helpers import torchrun_results

    worker = os.path.join(os.path.dirname(__file__), "distributed", "hf_callback_worker.py")
    got = torchrun_results(worker, 2, "save", tmp_path)
    assert [r["steps"] for r in got] == [[5], [5]]
    first, second = got[0]["commits"]
    assert first == second, "the folder saved again unchanged is committed once"


@pytest.mark.distributed
def test_the_step_of_the_final_model_is_rank_0s_on_every_rank(tmp_path):
    """Whether the best checkpoint's folder is still there was asked of each rank's own disk:
    ranks that answered differently called finalize with different steps."""
    from ckpt_helpers import torchrun_results

    worker = os.path.join(os.path.dirname(__file__), "distributed", "hf_callback_worker.py")
    got = torchrun_results(worker, 2, "published-as", tmp_path)
    assert [(r["step"], r["epoch"]) for r in got] == [(3, 0), (3, 0)]

