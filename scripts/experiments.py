"""Issue-sized experiments at several seeds as parallel jobs on one machine, with a deadline.

    python scripts/experiments.py --data dolly-15k.jsonl --out runs/experiments --seeds 42,43,44 --deadline 3600
    python scripts/experiments.py --data dolly-15k.jsonl --out /tmp/x --seeds 42 --smoke model.name=TINY  # minutes

Each experiment is one command per seed (`fedit compare ...` or scripts/privacy_experiment.py), so the
seeds run side by side, --jobs at a time (each holds its own model). Jobs still
running at --deadline are stopped (a rerun with the same --out resumes them: compare and the privacy script
reuse finished runs and resume cut ones); then each experiment is summarised over the seeds that finished
(`fedit compare --seeds`, which reuses every run and scores only what it has not scored). What ran, how long
and how it ended is in OUT/jobs.json; each job's output in OUT/logs/.

- strategies: the seven strategies with `compare --select`, options chosen on federated validation from grids
  fixed here (as docs/results-federated-evaluation.md), SCAFFOLD with local AdamW or SGD; in two halves
  (strategies-a: FedAvg, FedProx, FedAvgM, SCAFFOLD; strategies-b: FedAvg, FedAdam, FedYogi, FedAdagrad),
  each with its own FedAvg and Centralized, so that they run side by side;
- gap: where FedAvg's gap to Centralized comes from: FedAvg as in `strategies`, the same with each client drawn
  exactly once (federation.selection = "cover"), 28 rounds x 2 clients x 1 local step (the same examples: a
  pass over the ~890 training records in batches of 16), the same with FedAdam, and Centralized capped at
  17 optimizer steps (FedAvg's averaged sequential steps at seed 42);
- iid: FedAvg and Centralized on an IID split of the same records (data.scheme = "iid");
- ranks: equal rank 8 and mixed ranks [2, 4, 8, 16], factors and product aggregation, and mixed ranks with
  alpha_k = r_k (every client at the global's scaling) and with alpha_k = 2 r_k, the global at alpha 32 (every
  client at rank 8's scaling: the clean control, docs/hetero.md);
- privacy: scripts/privacy_experiment.py with its controls (no DP, clip-only at C = 0.1, DP at z = 1 and
  C = 0.1 with fixed and Poisson sampling, clip-only and DP at the median client update norm), 5 x 10 copies
  of canaries;
- scaled (first seed only): DP with many small clients: 1,000 clients, 100 per round in expectation (Poisson),
  10 rounds, LoRA r = 1 on q_proj and v_proj with A frozen, z for ε = 5 at δ = 1e-5, against no DP.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FEDIT = [sys.executable, "-m", "fedit.cli"]
PRIVACY = [sys.executable, str(ROOT / "scripts" / "privacy_experiment.py")]
EXPERIMENTS = ("strategies", "gap", "iid", "ranks", "privacy", "scaled")

# two halves, each with FedAvg (the reference of its intervals), so that a seed's comparison runs as two jobs
STRATEGY_GRIDS = {
    "strategies-a": ["--strategies", "fedavg,fedprox,fedavgm,scaffold", "--grid", "fedprox:strategy.proximal_mu=0.1,1",
                     "--grid", "fedavgm:strategy.server_learning_rate=0.1,0.2",
                     "--grid", "scaffold:strategy.local_optimizer=adamw,sgd"],
    "strategies-b": ["--strategies", "fedavg,fedadam,fedyogi,fedadagrad", "--grid", "fedadam:strategy.tau=0,1e-6",
                     "--grid", "fedyogi:strategy.tau=0,1e-6", "--grid", "fedadagrad:strategy.tau=0,1e-6"]}
SHORT = ["federation.rounds=28", "federation.clients_per_round=2", "train.max_steps=1"]
# train.max_steps=17 binds Centralized alone: no client of the small scale takes 17 steps in a round
GAP = (["--strategies", "fedavg,cover=fedavg,short=fedavg,short-fedadam=fedadam",
        "--set", "cover:federation.selection=cover",
        *[x for o in SHORT for x in ("--set", f"short:{o}", "--set", f"short-fedadam:{o}")]], ["train.max_steps=17"])
RANKS = ["--strategies",
         "fedavg,r8-product=fedavg,mixed=fedavg,mixed-product=fedavg,mixed-alpha=fedavg,mixed-alpha2=fedavg",
         "--set", "r8-product:lora.aggregation=product",
         "--set", "mixed:lora.r=16", "--set", "mixed:lora.client_ranks=[2,4,8,16]",
         "--set", "mixed-product:lora.r=16", "--set", "mixed-product:lora.client_ranks=[2,4,8,16]",
         "--set", "mixed-product:lora.aggregation=product", "--set", "mixed-alpha:lora.r=16",
         "--set", "mixed-alpha2:lora.r=16", "--set", "mixed-alpha2:lora.alpha=32"]
PRIVACY_RUNS = [["no-dp", "clip-Cmed", "z1-Cmed"], ["clip-C0.1"], ["z1-C0.1"], ["z1-C0.1-poisson"]]
SCALED = ["--min-size", "2", "--delta", "1e-5", "--set", "lora.r=1", "--set", 'lora.target_modules=["q_proj","v_proj"]',
          "--set", "lora.freeze_a=true"]
SCALED_Z = 0.834  # privacy.calibrate(5, q=0.1, rounds=10, delta=1e-5): the smallest z with ε <= 5 (to 0.1%)
SCALED_RUNS = ["no-dp", f"z{SCALED_Z}-Cmed-poisson"]  # in this order: Cmed is read from the no-DP run
# mixed-alpha: alpha_k = r_k (every client at the global's scaling 1); mixed-alpha2: alpha_k = 2 r_k with the
# global at alpha 32 (everyone at FedAvg r8's scaling 2, the clean control of docs/hetero.md)
RANKS_FILES = {"mixed-alpha": ("ranks-alpha.toml", 1), "mixed-alpha2": ("ranks-alpha2.toml", 2)}


def compares(a, out: Path) -> dict[str, tuple[list[str], list[str]]]:
    """{experiment: (its `fedit compare` options, its config overrides)} (argparse wants the overrides last)."""
    select = ["data.client_validation=0.1"]
    return {**{name: (["--select", *grids], select) for name, grids in STRATEGY_GRIDS.items()},
            "gap": (["--select", *GAP[0]], [*select, *GAP[1]]),
            "iid": (["--select", "--strategies", "fedavg"], [*select, "data.scheme=iid"]),
            "ranks": ([*RANKS, *[x for run, (f, _) in RANKS_FILES.items()
                                  for x in ("--set", f"{run}:lora.clients_file={out / f}")]], [])}


def write_ranks_file(a, out: Path) -> None:
    """The mixed-alpha runs' clients files: ranks 2, 4, 8, 16 by client id, alpha_k = m * r_k."""
    out.mkdir(parents=True, exist_ok=True)
    for f, m in RANKS_FILES.values():
        (out / f).write_text("".join(f"[{i}]\nr = {[2, 4, 8, 16][i % 4]}\nalpha = {m * [2, 4, 8, 16][i % 4]}\n\n"
                                     for i in range(4 if a.smoke else 20)))


def compare_command(a, out: Path, name: str, seeds: list[int], spec: tuple[list[str], list[str]]) -> list[str]:
    return [*FEDIT, "compare", "--scale", "smoke" if a.smoke else "small", "--seeds", ",".join(map(str, seeds)),
            *spec[0], "--out", str(out / name), "--data", a.data, *spec[1], "run.progress=false", *a.extra]


def privacy_command(a, seed: int, out: Path, scaled: bool = False) -> list[str]:
    """scripts/privacy_experiment.py for one seed: its defaults (or the scaled configuration), smaller in --smoke."""
    if scaled:
        size = ["--clients", "50", "--per-round", "5", "--rounds", "2", "--records", "400", "--test-per-category",
                "5"] if a.smoke else ["--clients", "1000", "--per-round", "100", "--rounds", "10", "--records", "0"]
        size += SCALED
    else:
        size = ["--records", "200", "--clients", "10", "--per-round", "4", "--rounds", "2", "--test-per-category",
                "5"] if a.smoke else []
    where = out / "scaled" if scaled else out / "privacy" / f"seed-{seed}"
    return [*PRIVACY, "--data", a.data, "--out", str(where), "--seed", str(seed),
            "--canary-repeats", "10" if a.smoke else "50", *size, *[x for e in a.extra for x in ("--set", e)]]


def jobs(a, seeds: list[int], out: Path) -> tuple[list[list[str]], dict[str, list[list[str]]]]:
    """(commands to run first, one after another; {job name: its commands, run in sequence})."""
    keep = set(a.only.split(",")) if a.only else set(EXPERIMENTS)
    first, todo = [], {}
    for s in seeds:
        for name, spec in compares(a, out).items():
            todo[f"{name}-{s}"] = [compare_command(a, out, name, [s], spec)]
        if "privacy" in keep:
            first.append([*privacy_command(a, s, out), "--data-only"])
        for i, runs in enumerate(PRIVACY_RUNS):
            todo[f"privacy-{s}-{i}"] = [[*privacy_command(a, s, out), "--runs", r] for r in runs]
    scaled = privacy_command(a, seeds[0], out, scaled=True)  # the scaled configuration at the first seed only
    if "scaled" in keep:
        first.append([*scaled, "--data-only"])
    todo["scaled"] = [[*scaled, "--runs", r] for r in SCALED_RUNS]
    return first, {k: v for k, v in todo.items() if k.split("-")[0] in keep}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="Dolly-15k as a JSONL file (or the hub id)")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="42,43,44")
    p.add_argument("--only", default="", help=f"comma-separated, of {', '.join(EXPERIMENTS)}")
    p.add_argument("--deadline", type=float, default=0, help="seconds after which running jobs are stopped")
    p.add_argument("--summary-deadline", type=float, default=300, help="seconds the summaries may take")
    p.add_argument("--jobs", type=int, default=4,
                   help="jobs at once (default 4). Each holds its own model; on one GPU without MPS, 28 at once "
                        "time-sliced it so finely that none finished (docs/performance.md, 'Many runs on one GPU')")
    p.add_argument("--smoke", action="store_true", help="the smoke scale, small privacy runs (a check of the jobs)")
    p.add_argument("extra", nargs="*", help="config overrides for every run, e.g. model.name=DIR")
    a = p.parse_args()
    out = Path(a.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    started = time.time()
    write_ranks_file(a, out)
    first, todo = jobs(a, seeds, out)
    for cmd in first:
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    record, running, waiting = {}, {}, list(todo.items())
    while running or waiting:
        over = a.deadline and time.time() - started > a.deadline
        while waiting and len(running) < a.jobs and not over:  # a job's commands run in sequence in one shell
            name, cmds = waiting.pop(0)
            log = open(out / "logs" / f"{name}.log", "w")
            script = " && ".join(shlex.join(c) for c in cmds)
            running[name] = (subprocess.Popen(["bash", "-c", script], env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True), time.time())
            print(f"{name}: started", flush=True)
        if over:
            for name, _ in waiting:
                record[name] = {"ended": "not started before the deadline"}
            waiting = []
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is None and not over:
                continue
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                ended = "stopped at the deadline"
            else:
                ended = "finished" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            record[name] = {"ended": ended, "seconds": round(time.time() - t0, 1)}
            print(f"{name}: {ended} after {record[name]['seconds']:.0f} s", flush=True)
            del running[name]
        time.sleep(2)
    summarise(a, seeds, out, record, env)
    record["_total_seconds"] = round(time.time() - started, 1)
    (out / "jobs.json").write_text(json.dumps(record, indent=1))


def summarise(a, seeds: list[int], out: Path, record: dict, env: dict) -> None:
    """Each experiment over the seeds whose job finished; all at once, within --summary-deadline."""
    done = lambda prefix: [s for s in seeds if record.get(f"{prefix}-{s}", {}).get("ended") == "finished"]  # noqa
    cmds = {}
    for name, spec in compares(a, out).items():
        if ok := done(name):
            cmds[name] = compare_command(a, out, name, ok, spec)
    for s in seeds:
        names = [r for i, runs in enumerate(PRIVACY_RUNS)
                 if record.get(f"privacy-{s}-{i}", {}).get("ended") == "finished" for r in runs]
        if names:
            cmds[f"privacy-{s}"] = [*privacy_command(a, s, out), "--runs", ",".join(names)]
    if record.get("scaled", {}).get("ended") == "finished":
        cmds["scaled"] = [*privacy_command(a, seeds[0], out, scaled=True), "--runs", ",".join(SCALED_RUNS)]
    procs = {n: subprocess.Popen(c, env=env, stdout=open(out / "logs" / f"summary-{n}.log", "w"),
                                 stderr=subprocess.STDOUT) for n, c in cmds.items()}
    t0 = time.time()
    for n, proc in procs.items():
        try:
            proc.wait(max(1.0, a.summary_deadline - (time.time() - t0)))
            record[f"summary-{n}"] = {"ended": "finished" if proc.returncode == 0 else f"failed ({proc.returncode})"}
        except subprocess.TimeoutExpired:
            proc.kill()
            record[f"summary-{n}"] = {"ended": "stopped at the deadline"}
        print(f"summary {n}: {record[f'summary-{n}']['ended']}", flush=True)


if __name__ == "__main__":
    main()
