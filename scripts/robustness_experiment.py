"""Malicious clients on Dolly: held-out loss under attack with the plain mean and a defence, and a
backdoor's success with and without the norm bound.

The same split, init, client selection and local budget for every run; only the attack and the
aggregation differ:
- data: --records Dolly records drawn with --seed, --test-per-category of each category held out,
  the rest over 10 Dirichlet(0.5) clients; every client takes part in every round;
- training: SmolLM2-135M-Instruct + LoRA r=8 on every linear layer, --rounds rounds of
  --steps local steps of 16 examples;
- attackers: 2 of the 10 clients (attack.fraction = 0.2, drawn with the seed): scale x100
  (model replacement), sign_flip x10, and a backdoor (every second record of theirs asks with
  the trigger and answers with the target);
- defence: Multi-Krum with f = 2, the best column of the tiny-model attack table
  (docs/robustness.md), chosen before this experiment; for the backdoor the norm bound, set to
  the median of the honest clients' update norms in round 1 of the run without attack (training
  data, not the test set).

Writes robustness.md into --out; finished runs are reused on a rerun.

    python scripts/robustness_experiment.py --data dolly-15k.jsonl --out runs/robustness
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rich.console import Console

from fedit import config as config_mod
from fedit.cli import quiet_libraries
from fedit import server
from fedit.data import partition
from fedit.reproduce import train_or_reuse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="Dolly-15k: a JSONL file or the hub id")
    p.add_argument("--out", required=True)
    p.add_argument("--records", type=int, default=600)
    p.add_argument("--test-per-category", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args()
    quiet_libraries()
    out = Path(a.out)
    parts = out / "data"
    if not (parts / "manifest.json").is_file():
        partition.make(a.data, parts, clients=10, alpha=0.5, min_size=20, test_per_category=a.test_per_category,
                       seed=a.seed, sample=a.records)

    def run(name: str, **sections) -> server.RunDir:
        run_dir = out / "runs" / name
        base = {"data": {"clients_dir": str(parts)},
                "train": {"lr": 5e-4, "batch_size": 16, "micro_batch_size": 8, "cutoff_len": 256,
                          "max_steps": a.steps},
                "federation": {"rounds": a.rounds, "clients_per_round": 10, "seed": a.seed},
                "eval": {"batch_size": 8, "cutoff_len": 512},
                "run": {"out": str(run_dir), "progress": False}}
        for key, values in sections.items():
            base[key] = {**base.get(key, {}), **values}
        train_or_reuse(name, config_mod.from_dict(base), run_dir, out, None, Console(), name)
        return server.RunDir(run_dir)

    krum = {"aggregator": "multikrum", "byzantine_clients": 2}
    rows = []
    clean = run("none-mean")
    rows.append(("none", "mean", clean))
    rows.append(("none", "multikrum f=2", run("none-multikrum", federation=krum)))
    for kind, factor in (("scale", 100.0), ("sign_flip", 10.0)):
        attack = {"kind": kind, "factor": factor, "fraction": 0.2}
        rows.append((f"{kind} x{factor:g}", "mean", run(f"{kind}-mean", attack=attack)))
        rows.append((f"{kind} x{factor:g}", "multikrum f=2", run(f"{kind}-multikrum", attack=attack, federation=krum)))
    honest = [c["update_norm"] for c in clean.events("client") if c["round"] == 1 and c.get("accepted")]
    bound = statistics.median(honest)
    backdoor = {"kind": "backdoor", "fraction": 0.2}
    rows.append(("backdoor", "mean", run("backdoor-mean", attack=backdoor)))
    rows.append(("backdoor", f"mean + max_update_norm {bound:.3g}",
                 run("backdoor-normbound", attack=backdoor, federation={"max_update_norm": bound})))

    attackers = json.loads((out / "runs" / "scale-mean" / "run.json").read_text())["attack"]["clients"]
    lines = [f"Dolly, {a.records} records, 10 Dirichlet(0.5) clients, all in every round, {a.rounds} rounds of "
             f"{a.steps} local steps x 16 examples; SmolLM2-135M-Instruct + LoRA r=8; attackers: clients "
             f"{attackers}. Honest update norms in round 1 without attack: median {bound:.3g} "
             f"(min {min(honest):.3g}, max {max(honest):.3g}).", "",
             "| attack (2 of 10) | aggregation | held-out loss, rounds 0..R | backdoor: trigger → target | "
             "without trigger |", "|---|---|---|---|---|"]
    for attack, agg, rd in rows:
        losses = " → ".join(f"{row['eval']['loss']:.4f}" for row in rd.events("round") if "eval" in row)
        b = rd.path / "backdoor.json"
        hit = json.loads(b.read_text()) if b.is_file() else None
        shares = (f"{hit['with_trigger']:.0%}", f"{hit['without']:.0%}") if hit else ("", "")
        lines.append(f"| {attack} | {agg} | {losses} | {shares[0]} | {shares[1]} |")
    (out / "robustness.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
