"""Ranks that do not share the local backend's folder, as on machines each with a disk of its
own: the rank named on the command line sees a folder of its own at the backend's path (a tmpfs
mounted over it in a mount namespace of its own). Every rank writes what it saw as JSON."""

import ctypes
import json
import os
import sys


def own_disk(path: str) -> None:
    """This process alone sees an empty tmpfs at ``path`` (needs root; before any thread starts)."""
    libc = ctypes.CDLL(None, use_errno=True)
    newns, rec, private = 0x00020000, 16384, 1 << 18
    if (libc.unshare(newns) or libc.mount(None, b"/", None, rec | private, None)
            or libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", 0, None)):
        raise OSError(ctypes.get_errno(), f"could not give this rank a folder of its own at {path}")


def plugin_manager(root: str, rank: int):
    """ckptkit's plugins, and the type ``late``: the local backend, whose first listing on rank 1
    finds a step committed just before it (a copy of step 3, sealed as step 9)."""
    import shutil

    from ckptkit.local import LocalBackend
    from ckptkit.plugin import hookimpl
    from ckptkit.plugins import make_plugin_manager

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ckpt_helpers import rewrite_manifest

    class LateLocal(LocalBackend):
        planted = False

        @hookimpl
        def list_checkpoints(self, run_name):
            if rank == 1 and not LateLocal.planted:
                LateLocal.planted = True
                run = os.path.join(root, run_name)
                shutil.copytree(os.path.join(run, "step-0000000003"), os.path.join(run, ".tmp-late"))
                rewrite_manifest(os.path.join(run, ".tmp-late"), step=9)
                os.rename(os.path.join(run, ".tmp-late"), os.path.join(run, "step-0000000009"))
            return super().list_checkpoints(run_name=run_name)

    pm = make_plugin_manager()
    pm.add_backend_type("late", LateLocal)
    return pm


def files_under(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def main() -> None:
    scenario, workdir, blind = sys.argv[1], sys.argv[2], int(sys.argv[3])
    root = os.path.join(workdir, "ckpts")
    os.environ["LOCAL_RANK"] = "0"  # each rank stands for a machine of its own
    if int(os.environ["RANK"]) == blind:  # -1: none
        own_disk(root)
        staged = os.path.join(workdir, "disk")
        if os.path.isdir(staged):  # a copy of the checkpoints staged onto this machine's disk
            import shutil

            shutil.copytree(staged, root, dirs_exist_ok=True)
    import torch
    import torch.distributed as dist

    import ckptkit

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    fmt = "dcp" if "dcp" in scenario else "torch"
    config = {"run_name": "r", "backends": {"local": {"type": "local", "path": root}},
              "roles": {"resume": {"backends": ["local"], "every_n_steps": 1, "keep_last": 2, "format": fmt}},
              "distributed": {"timeout_s": 60}}
    if scenario == "restore-two":  # and a folder that every rank shares, as an object store would be
        config["backends"]["durable"] = {"type": "local", "path": os.path.join(workdir, "durable")}
        config["roles"]["resume"]["backends"].append("durable")
    if scenario == "restore-meanwhile":
        # One folder that every rank shares, where another training commits step 9 while rank 1
        # lists the run, after rank 0 did.
        config["backends"]["local"]["type"] = "late"
    ck = ckptkit.CheckpointManager.from_config(config, plugin_manager=plugin_manager(root, rank))
    torch.manual_seed(0)
    if scenario.endswith("-fsdp"):  # each rank reads its own shard, from its own file
        from torch.distributed.fsdp import fully_shard

        model = fully_shard(torch.nn.Linear(4, 2))
    else:
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result: dict = {"error": None}
    try:
        if scenario.startswith("save-files"):
            # A trainer's checkpoint folder: rank 0 writes the weights, each rank its random
            # state, into one folder every rank shares, or into a folder per rank (an output
            # folder on each machine's own disk).
            folder = os.path.join(workdir, "out" if scenario == "save-files-shared" else f"out-{rank}", "ckpt-5")
            os.makedirs(folder, exist_ok=True)
            if rank == 0:
                with open(os.path.join(folder, "model.bin"), "wb") as f:
                    f.write(b"weights")
            with open(os.path.join(folder, f"rng_state_{rank}.pth"), "wb") as f:
                f.write(b"rng %d" % rank)
            ck.save_files(step=5, files=folder)
        elif scenario == "save-dcp":
            ck.save(step=1, model=model, optimizer=opt, rank_extra={"pos": rank})
        elif scenario.startswith("save-dcp-steps"):
            for step in (1, 2):
                with torch.no_grad():  # other weights at each step
                    for p in model.parameters():
                        p.add_(1.0)
                ck.save(step=step, model=model, optimizer=opt, rank_extra={"pos": 100 * step + rank})
        else:
            restored = ck.restore(model, opt)
            result["step"] = None if restored is None else restored.step
            result["pos"] = None if restored is None else restored.rank_extra.get("pos")
    except Exception as exc:  # noqa: BLE001 - what each rank was told is the result
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["files"] = files_under(root)
    ck.close()
    with open(os.path.join(workdir, f"result-{scenario}-{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
