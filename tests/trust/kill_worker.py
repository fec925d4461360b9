"""A training job for the SIGKILL torture: it resumes, then saves every step until it is killed.

Run as a zygote: ``python kill_worker.py`` imports torch, ckptkit and the store clients once,
then reads one JSON job per line on stdin and forks a child per job, answering each with the
child's pid. Forking saves the seconds of imports that every trial would otherwise pay (torch's
DataLoader forks its workers from a process that imported torch in the same way). SIGCHLD is
ignored, so killed children are reaped at once and their pids disappear.

A child builds a ``CheckpointManager`` from ``job["config"]``, restores, then for each step sets
every weight to ``step`` and every bias to ``-step`` (so the expected state of any step is
known) and saves. It appends one line per event to ``job["log"]``, each with a single
``os.write`` so that a kill never leaves half a line:

    started <pid>
    restored <step or none>
    acked <step>    this step is committed: its save returned (sync), or the next save did (async)
    error <text>    a save or restore raised
    done

With ``job["steps"]`` it saves that many steps, closes the manager and exits; otherwise it runs
until it is killed.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import tempfile
import traceback


def set_step(model, step: int) -> None:
    import torch

    with torch.no_grad():
        model.weight.fill_(float(step))
        model.bias.fill_(-float(step))


def make_model(shape):
    import torch

    return torch.nn.Linear(*shape)


def run(job: dict) -> None:
    import ckptkit

    log = os.open(job["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def say(text: str) -> None:
        os.write(log, (" ".join(text.split()) + "\n").encode())

    say(f"started {os.getpid()}")
    model = make_model(job["shape"])
    ck = ckptkit.CheckpointManager.from_config(job["config"], run_name=job["run_name"])
    try:
        restored = ck.restore(model=model)
    except Exception as exc:
        say(f"error restore {type(exc).__name__}: {exc}")
        raise
    say(f"restored {restored.step if restored else 'none'}")
    asynchronous = job["config"]["roles"]["resume"].get("async", False)
    step = restored.step + 1 if restored else 0
    saved = 0
    while job.get("steps") is None or saved < job["steps"]:
        set_step(model, step)
        try:
            ck.save(step=step, model=model, extra={"step": step})
        except Exception as exc:
            say(f"error save {step} {type(exc).__name__}: {exc}")
            raise
        if asynchronous:
            if saved:
                say(f"acked {step - 1}")
        else:
            say(f"acked {step}")
        step += 1
        saved += 1
    ck.close()
    if asynchronous and saved:
        say(f"acked {step - 1}")
    say("done")


def die_with_parent() -> None:
    """Ask the kernel to kill this process when the zygote exits, so no job outlives a test run."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def child(job: dict) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    die_with_parent()
    out = os.open(job["log"] + ".stderr", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.environ["TMPDIR"] = job["tmpdir"]
    tempfile.tempdir = None
    code = 0
    try:
        run(job)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def zygote() -> None:
    # Everything a child needs, imported once before any fork; no client is built yet (their
    # event-loop threads must not exist in the parent when it forks).
    import torch  # noqa: F401

    import ckptkit  # noqa: F401
    from ckptkit.plugins import make_plugin_manager

    make_plugin_manager()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    print("ready", flush=True)
    children = []
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(job)
        children.append(pid)
        print(pid, flush=True)
    # stdin closed: the test run is over; no job may go on saving.
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    zygote()
