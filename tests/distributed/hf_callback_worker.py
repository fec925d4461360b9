"""The transformers callback's saves on two ranks that share no output folder, as on two nodes:
the Trainer writes each checkpoint folder on rank 0's node only, and saves the last step's
folder twice (transformers before 4.50, save_strategy="epoch"). Every rank writes what it saw."""

import json
import os
import sys
import types

import torch.distributed as dist
from transformers import TrainerControl, TrainerState

from ckptkit.integrations.transformers import CkptkitCallback


def main() -> None:
    scenario, workdir = sys.argv[1:3]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = {"run_name": "hf",
              "backends": {"local": {"type": "local", "path": os.path.join(workdir, "ckpts")}},
              "roles": {"resume": {"backends": ["local"], "every_n_steps": 1, "keep_last": 2}},
              "distributed": {"timeout_s": 60}}
    callback = CkptkitCallback(config)
    args = types.SimpleNamespace(output_dir=os.path.join(workdir, f"node-{rank}"))
    state = TrainerState(global_step=5, epoch=1.0)
    if scenario == "published-as":
        # The best checkpoint's folder, which the Trainer loaded back at the end, on rank 0's disk only.
        args.load_best_model_at_end = True
        state.best_model_checkpoint = os.path.join(args.output_dir, "checkpoint-3")
        state.log_history = [{"step": 3, "epoch": 0.0, "eval_loss": 0.5}]
        if rank == 0:
            os.makedirs(state.best_model_checkpoint)
        dist.barrier()
        step, epoch, _ = callback._published_as(args, state)
        callback.manager.close()
        with open(os.path.join(workdir, f"result-{scenario}-{rank}.json"), "w") as f:
            json.dump({"step": step, "epoch": epoch}, f)
        dist.destroy_process_group()
        return
    if rank == 0:
        folder = os.path.join(args.output_dir, "checkpoint-5")
        os.makedirs(folder)
        with open(os.path.join(folder, "trainer_state.json"), "w") as f:
            json.dump({"global_step": 5}, f)
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(b"weights")
    dist.barrier()
    manifest = os.path.join(workdir, "ckpts", "hf", "step-0000000005", "manifest.json")
    commits = []
    for _ in range(2):
        callback.on_save(args, state, TrainerControl())
        commits.append(os.stat(manifest).st_mtime_ns if rank == 0 else None)
    # Every rank meets here: a rank still inside a save would be at another ckptkit call.
    callback.manager.coll.agree("after both saves", None)
    steps = [ref.step for ref in callback.manager.list_checkpoints()]
    callback.manager.close()
    with open(os.path.join(workdir, f"result-{scenario}-{rank}.json"), "w") as f:
        json.dump({"steps": steps, "commits": commits}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
