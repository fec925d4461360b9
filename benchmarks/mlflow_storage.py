"""Bytes stored per backend for a 30-step run (saves every 5 steps, keep_last=5).

Routed: resume checkpoints on local disk, the final model once in MLflow (embedded sqlite store).
Duplicate: the same run, with every resume checkpoint also logged to MLflow as an artifact, which
is measured for real in a second MLflow run. Then ``ckptkit plan`` predicts both for the measured
state size, and for the issue's inputs (14 GB state, 30000 steps, a save every 1000, keep_last 5).

    python benchmarks/mlflow_storage.py [--width 1024] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1024, help="hidden width of the 3-layer MLP")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from mlflow.tracking import MlflowClient

    from ckptkit import CheckpointManager, Config
    from ckptkit.plan import format_size, make_plan, parse_size

    with tempfile.TemporaryDirectory(prefix="ckptkit-bench-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        config = {
            "algorithm": "bench",
            "backends": {"scratch": {"type": "local", "path": f"{tmp}/scratch"},
                         "registry": {"type": "mlflow", "tracking_uri": uri, "experiment": "bench",
                                      "artifact_location": f"{tmp}/artifacts",
                                      "registered_model_name": "bench_{algorithm}"}},
            "roles": {"resume": {"backends": ["scratch"], "every_n_steps": 5, "keep_last": 5},
                      "final": {"backends": ["registry"]}},
        }
        torch.manual_seed(0)
        w = args.width
        model = torch.nn.Sequential(torch.nn.Linear(w, w), torch.nn.ReLU(), torch.nn.Linear(w, w),
                                    torch.nn.ReLU(), torch.nn.Linear(w, 8))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ck = CheckpointManager.from_config(config, run_name="bench")
        client = MlflowClient(uri)
        dup_exp = client.create_experiment("duplicate", artifact_location=f"file://{tmp}/dup-artifacts")
        dup_run = client.create_run(dup_exp, run_name="every-checkpoint").info.run_id
        state_sizes = []
        for step in range(30):
            loss = model(torch.randn(16, w)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            for ref in ck.save(step=step, epoch=0, model=model, optimizer=opt, metrics={"loss": loss.item()}):
                state = os.path.join(ref.local_dir, "state.pt")
                state_sizes.append(os.path.getsize(state))
                client.log_artifact(dup_run, state, f"checkpoints/step-{step}")
        ck.finalize(model=model, step=29, epoch=0, metrics={"loss": loss.item()})
        ck.close()

        local = du(f"{tmp}/scratch")
        routed_mlflow = du(f"{tmp}/artifacts")
        final = routed_mlflow
        dup_resume = du(f"{tmp}/dup-artifacts")
        measured = {
            "saves": len(state_sizes), "state_size": max(state_sizes), "final_size": final,
            "routed": {"local_resume": local, "mlflow": routed_mlflow, "total": local + routed_mlflow},
            "duplicate": {"local_resume": local, "mlflow": dup_resume + final,
                          "total": local + dup_resume + final},
        }
        measured["resume_cut"] = 1 - local / (local + dup_resume)
        measured["total_cut"] = 1 - measured["routed"]["total"] / measured["duplicate"]["total"]
        cfg = Config.from_dict(config)
        small = make_plan(cfg, max(state_sizes), 30, final_size=final)
        issue = make_plan(cfg.__class__.from_dict({**config, "roles": {
            "resume": {"backends": ["scratch"], "every_n_steps": 1000, "keep_last": 5},
            "final": {"backends": ["registry"]}}}), parse_size("14GB"), 30000)
    out = {"measured_30_steps": measured, "plan_30_steps": small.to_dict()["totals"],
           "plan_issue_14GB_30000": issue.to_dict()["totals"]}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    m = measured
    print(f"30 steps, {m['saves']} saves of {format_size(m['state_size'])}, keep_last=5, final {format_size(final)}")
    print(f"  routed:    local resume {format_size(m['routed']['local_resume'])}, MLflow {format_size(m['routed']['mlflow'])}"
          f" -> {format_size(m['routed']['total'])}")
    print(f"  duplicate: local resume {format_size(m['duplicate']['local_resume'])}, MLflow {format_size(m['duplicate']['mlflow'])}"
          f" -> {format_size(m['duplicate']['total'])}")
    print(f"  resume-checkpoint bytes cut {m['resume_cut']:.1%}, everything cut {m['total_cut']:.1%}")
    t = out["plan_30_steps"]
    print(f"  ckptkit plan predicts: {format_size(t['end'])} against {format_size(t['duplicate_end'])}")
    t = out["plan_issue_14GB_30000"]
    print(f"ckptkit plan, 14 GB state, 30000 steps, every 1000, keep_last 5: resume {format_size(t['resume_end'])} "
          f"against {format_size(t['duplicate_resume_end'])} ({t['resume_cut']:.1%} cut); with the final model "
          f"{format_size(t['end'])} against {format_size(t['duplicate_end'])} ({t['total_cut']:.1%} cut)")


if __name__ == "__main__":
    main()
