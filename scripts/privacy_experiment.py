"""What client-level DP costs and buys on Dolly: held-out loss and canary exposure at a few noise levels.

The same split, init, client selection and local budget for every run; only privacy differs:
- data: --records Dolly records drawn with --seed, --test-per-category of each category held out,
  the rest over --clients Dirichlet(0.5) clients (at least 5 records each);
- training: SmolLM2-135M-Instruct (the default model), LoRA r=8 on every linear layer,
  --rounds rounds of --per-round clients drawn with the public seed (privacy.sampling = "fixed":
  no amplification by sampling is claimed), one local epoch each;
- canaries: 5 random PINs, --canary-repeats copies each, in the data of the client the seed selects most
  often, each ranked after training among 200 never-inserted PINs (exposure in bits, 7.65 the
  maximum, about 1.44 when not memorised);
- runs (--runs, comma-separated names):
  ``no-dp``: no clipping, no noise;
  ``clip-C<c>``: each client's change clipped to norm c (federation.max_update_norm), no noise, no privacy: the
  control that separates what clipping costs from what noise costs (the mean is weighted by examples, where
  DP's is unweighted over the expected clients);
  ``z<z>-C<c>``: client-level DP, noise multiplier z, clipping norm c, δ = --delta, the round's clients drawn
  with the public seed (no amplification claimed); ``z<z>-C<c>-poisson``: each client joins each round with
  probability q = per-round / clients, and the accountant counts the sampled Gaussian mechanism.
  ``C<c>`` may be ``Cmed``: the median client update norm of this --out's ``no-dp`` run (run it first).
  --noise (the older form) adds ``z<z>-C<--clip>`` for each z > 0 and ``no-dp`` for 0.

Writes privacy.md (a table: ε, held-out loss per round, exposure) and privacy.png (held-out loss
per round, one line per run) into --out; finished runs are reused on a rerun.

    python scripts/privacy_experiment.py --data dolly-15k.jsonl --out runs/privacy
    python scripts/privacy_experiment.py --data dolly-15k.jsonl --out runs/privacy --canary-repeats 50 \
        --runs no-dp,clip-C0.1,z1-C0.1,z1-C0.1-poisson,clip-Cmed,z1-Cmed
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

from rich.console import Console

from fedit import config as config_mod
from fedit.cli import guarded, quiet_libraries
from fedit import server
from fedit.data import partition
from fedit.errors import FeditError
from fedit.reproduce import train_or_reuse
from fedit.strategies import FedAvg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="Dolly-15k: a JSONL file or the hub id")
    p.add_argument("--out", required=True)
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--test-per-category", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-round", type=int, default=20)
    p.add_argument("--noise", default="", help="noise multipliers, 0 for no DP (the older form of --runs)")
    p.add_argument("--runs", default="", help="run names (see above); default no-dp,z0.5-C<clip>,z1-C<clip>")
    p.add_argument("--clip", type=float, default=0.1)
    p.add_argument("--delta", type=float, default=1e-4)
    p.add_argument("--canary-repeats", type=int, default=10, help="copies of each of the 5 secrets")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--min-size", type=int, default=5, help="records every client holds at least")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run (repeatable), e.g. lora.r=1")
    p.add_argument("--data-only", action="store_true", help="write the split and stop (before parallel runs)")
    a = p.parse_args()
    quiet_libraries()
    out = Path(a.out)
    parts = out / "data"
    if not (parts / "manifest.json").is_file():
        partition.make(a.data, parts, clients=a.clients, alpha=0.5, min_size=a.min_size,
                       test_per_category=a.test_per_category, seed=a.seed, sample=a.records)
    if a.data_only:
        return
    clients = partition.read_manifest(parts)["clients"]
    ids = [c["id"] for c in clients]
    picks = Counter(c for r in range(1, a.rounds + 1) for c in FedAvg().select(r, ids, a.per_round, a.seed))
    canary_client = min(ids, key=lambda c: (-picks[c], c))
    names = [n for n in a.runs.split(",") if n] or \
        [("no-dp" if float(z) == 0 else f"z{float(z):g}-C{a.clip:g}") for z in (a.noise or "0,0.5,1").split(",")]
    suffix = f"-x{a.canary_repeats}" if a.canary_repeats != 10 else ""
    runs = {name: parse_run(name) for name in names}  # every name checked before anything trains
    if None in runs.values():
        p.error(f"--runs: {', '.join(repr(n) for n, r in runs.items() if r is None)}: each must be no-dp, "
                f"clip-C<c>, z<z>-C<c> or z<z>-C<c>-poisson (<c> a number or med)")
    rows = []
    for name, (z, clip, sampling) in runs.items():
        if clip == "med":
            clip = median_norm(out / "runs" / f"no-dp{suffix}")
        dp = z > 0
        run_dir = out / "runs" / (name + suffix)
        cfg = config_mod.load(None, a.set, base_name="the privacy experiment", base={
            "data": {"clients_dir": str(parts)},
            "train": {"lr": 5e-4, "batch_size": 16, "micro_batch_size": 8, "cutoff_len": 256},
            "federation": {"rounds": a.rounds, "clients_per_round": a.per_round, "seed": a.seed,
                           **({"max_update_norm": clip} if clip and not dp else {})},
            "eval": {"batch_size": 8, "cutoff_len": 512},
            "privacy": {"enabled": True, "noise_multiplier": z, "clipping_norm": clip, "delta": a.delta,
                        "sampling": sampling} if dp else {},
            "canary": {"client": canary_client, "count": 5, "repeats": a.canary_repeats, "references": 200},
            "run": {"out": str(run_dir), "progress": False}})
        train_or_reuse(name, cfg, run_dir, out, None, Console(), name)
        rounds = list(server.RunDir(run_dir).events("round"))  # the run's round rows, read once
        evals = [row["eval"]["loss"] for row in rounds if "eval" in row]
        eps = [row["privacy"]["epsilon"] for row in rounds if "privacy" in row]
        canary = json.loads((run_dir / "canary.json").read_text())
        rows.append({"name": name + suffix, "z": z, "clip": clip, "sampling": sampling,
                     "epsilon": eps[-1] if eps else None, "loss": evals,
                     "canary_rounds": rounds_joined(rounds, canary_client),
                     "exposure": canary["mean_exposure"], "ranks": [c["rank"] for c in canary["canaries"]]})
        print(f"{name}: held-out loss {' -> '.join(f'{x:.4f}' for x in evals)}; mean exposure "
              f"{canary['mean_exposure']:.2f} bits", flush=True)
    (out / "privacy.json").write_text(json.dumps({"seed": a.seed, "canary_client": canary_client, "rows": rows},
                                                 indent=1))
    from fedit.adapter import load_adapter_file

    # d: the values that train and are noised (a frozen A neither trains nor travels)
    adapter = load_adapter_file(server.RunDir(out / "runs" / rows[0]["name"]).round_dir(0))
    values = sum(v.numel() for k, v in adapter.items() if not (cfg.lora.freeze_a and "lora_A" in k))
    lines = [f"Dolly, {sum(c['examples'] for c in clients):,} training records, {len(ids)} clients (Dirichlet 0.5), "
             f"{a.rounds} rounds x {a.per_round} clients, {cfg.model.name} + LoRA r={cfg.lora.r} on "
             f"{', '.join(cfg.lora.target_modules)}"
             f"{' with A frozen' if cfg.lora.freeze_a else ''} (d = {values:,} trained values); "
             f"δ = {a.delta:g}; canaries in client {canary_client} "
             f"(the fixed-size draw selects it in {picks[canary_client]} of {a.rounds} rounds; a Poisson draw "
             f"in as many as it happens to: the table says how many it took part in).", "",
             "| run | z | C | sampling | ε | held-out loss, rounds 0..R | canary client's rounds | "
             "canary exposure (bits, mean of 5) | canary ranks of 201 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        lines.append(f"| {r['name']} | {r['z']:g} | {r['clip']:.4g} | {r['sampling']} | {eps} | "
                     f"{' → '.join(f'{x:.4f}' for x in r['loss'])} | {r['canary_rounds']} of {a.rounds} | "
                     f"{r['exposure']:.2f} | "
                     f"{', '.join(map(str, r['ranks']))} |")
    (out / "privacy.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        label = r["name"] + ("" if r["epsilon"] is None else f" (ε = {r['epsilon']:.1f})")
        ax.plot(range(len(r["loss"])), r["loss"], marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out loss")
    ax.set_title("Client-level DP on Dolly (SmolLM2-135M)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "privacy.png", dpi=120)
    print(f"wrote {out / 'privacy.md'} and {out / 'privacy.png'}")


def parse_run(name: str) -> tuple[float, float | str, str] | None:
    """A run's name -> (noise multiplier z, 0 for none; clipping norm C, 0 for none or "med"; sampling), or
    None for a name that is not one of the forms in the module's docstring."""
    number = r"[0-9]*\.?[0-9]+"
    m = re.fullmatch(rf"no-dp|(clip|z({number}))-C({number}|med)(-poisson)?", name)
    if not m or (m.group(1) == "clip" and m.group(4)) or (m.group(2) is not None and float(m.group(2)) <= 0):
        return None
    clip = m.group(3) if m.group(3) in (None, "med") else float(m.group(3))
    return float(m.group(2) or 0), clip or 0.0, "poisson" if m.group(4) else "fixed"


def rounds_joined(rounds: list[dict], client: int) -> int:
    """The rounds (a run's round rows) a client took part in: with Poisson sampling it is drawn independently
    each round, so the canary client need not join the rounds the fixed-size draw gives it."""
    return sum(client in row["clients"] for row in rounds if row["round"] > 0)


def median_norm(run_dir: Path) -> float:
    """The median L2 norm of the client changes of a run without clipping (each client line's update_norm)."""
    norms = [c["update_norm"] for c in server.RunDir(run_dir).events("client") if "update_norm" in c]
    if not norms:
        raise FeditError(f"{run_dir}: no client update norms; run no-dp first (C = Cmed is read from it)")
    return round(statistics.median(norms), 4)


if __name__ == "__main__":
    sys.exit(guarded(main, "privacy_experiment.py"))
