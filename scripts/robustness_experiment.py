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
  data, not the test set);
- the backdoor plain (an update that looks honest) and boosted x5 (attack.boost = clients /
  attackers, so that the two attackers' changes together weigh as much as the whole round's,
  Bagdasaryan et al. 2020); its success is the share of held-out prompts with the trigger answered
  with the target, and the target's loss per token as their answer with and without the trigger.

Writes robustness.md into --out; finished runs are reused on a rerun.

    python scripts/robustness_experiment.py --data dolly-15k.jsonl --out runs/robustness
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from rich.console import Console

from fedit import config as config_mod
from fedit.cli import guarded, quiet_libraries
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
    for boost, tag, label in ((1.0, "backdoor", "backdoor"), (5.0, "backdoor5", "backdoor boosted x5")):
        backdoor = {"kind": "backdoor", "fraction": 0.2, "boost": boost}
        rows.append((label, "mean", run(f"{tag}-mean", attack=backdoor)))
        rows.append((label, f"mean + max_update_norm {bound:.3g}",
                     run(f"{tag}-normbound", attack=backdoor, federation={"max_update_norm": bound})))

    attackers = json.loads((out / "runs" / "scale-mean" / "run.json").read_text())["attack"]["clients"]
    lines = [f"Dolly, {a.records} records, 10 Dirichlet(0.5) clients, all in every round, {a.rounds} rounds of "
             f"{a.steps} local steps x 16 examples; SmolLM2-135M-Instruct + LoRA r=8; attackers: clients "
             f"{attackers}. Honest update norms in round 1 without attack: median {bound:.3g} "
             f"(min {min(honest):.3g}, max {max(honest):.3g}).", "",
             "| attack (2 of 10) | aggregation | held-out loss, rounds 0..R | backdoor: trigger → target "
             "(without trigger) | target's loss with trigger (without) |", "|---|---|---|---|---|"]
    for attack, agg, rd in rows:
        losses = " → ".join(f"{row['eval']['loss']:.4f}" for row in rd.events("round") if "eval" in row)
        hit = backdoor_results(rd) if attack.startswith("backdoor") else None
        shares = f"{hit['with_trigger']:.0%} ({hit['without']:.0%})" if hit else ""
        tl = f"{hit['target_loss']['with_trigger']:.3f} ({hit['target_loss']['without']:.3f})" if hit else ""
        lines.append(f"| {attack} | {agg} | {losses} | {shares} | {tl} |")
    init = target_loss_of(clean, clean.path / "rounds" / "round_0000")
    trained = target_loss_of(clean, clean.path / "adapter")
    lines += ["", f"The target's loss with the trigger (without): {init['with_trigger']:.3f} ({init['without']:.3f}) "
                  f"under the untuned init, {trained['with_trigger']:.3f} ({trained['without']:.3f}) after the run "
                  f"without attack."]
    (out / "robustness.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def backdoor_results(rd: server.RunDir) -> dict:
    """backdoor.json, with the target's loss added to one written before fedit measured it."""
    path = rd.path / "backdoor.json"
    b = json.loads(path.read_text())
    if "target_loss" not in b:
        b["target_loss"] = target_loss_of(rd, rd.path / "adapter")
        path.write_text(json.dumps(b, indent=2))
    return b


def target_loss_of(rd: server.RunDir, adapter_dir: Path) -> dict:
    """The target's loss as the answer to the run's held-out prompts with and without its trigger, under
    the adapter saved in ``adapter_dir``."""
    from fedit import runner
    from fedit.adapter import load_adapter_file
    from fedit.attacks import target_loss
    from fedit.data.records import load_records

    cfg = config_mod.load(rd.path / "config.toml")
    prep = runner.prepare(cfg)
    return target_loss(prep.loaded, load_adapter_file(adapter_dir), load_records(prep.test_file).records,
                       cfg.attack.trigger, cfg.attack.target, cfg.data.template,
                       cfg.eval.cutoff_len or cfg.train.cutoff_len, cfg.eval.batch_size)


if __name__ == "__main__":
    sys.exit(guarded(main, "robustness_experiment.py"))
