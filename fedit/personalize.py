"""`fedit personalize`: is the federation's model better on my data than what I could train alone?

For each client of a finished run (all, or a seeded sample: personalize.clients) and on
that client's own validation split (data.client_validation: records the federation
never trained on), three adapters are scored with the training loss and masking:

- global: the run's final global adapter, as the federation hands it to every site;
- personalized: the global adapter fine-tuned for personalize.steps optimizer steps on
  the client's own training split (train.batch_size, train.lr, a fresh AdamW), saved as
  a PEFT directory in <run>/personalized/client_NNNNN;
- local-only: an adapter trained from the base model on the client's training split
  alone, for personalize.local_epochs passes (the paper's Local-k: one epoch);

beside the untuned base model. Local training here is plain local training whatever
the run's strategy (no proximal term, no control variate), at the run's global LoRA
rank. Results: personalize.json, personalize.md and personalize.png (one point per
client: its global loss against its local-only loss, personalized marked), written
atomically; a rerun reuses the clients already done with the same settings.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from fedit import config as config_mod
from fedit.checkpoint import atomic_write, atomic_write_json
from fedit.errors import FeditError

CHANGEABLE = ("personalize.", "eval.batch_size=", "run.progress=")  # what a user may set here; the rest is the run's


def personalize(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), console=None,
                loaded=None) -> Path:
    from fedit import client, runner
    from fedit.adapter import load_adapter_file, save_adapter
    from fedit.evaluation import federated
    from fedit.evaluation.heldout import heldout_loss
    from fedit.protocol import GLOBAL, FitIns

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file() or not (run_dir / "adapter" / "adapter_model.safetensors").is_file():
        raise FeditError(f"{run_dir} is not a finished fedit run (no config.toml or no final adapter); pass the "
                         f"run.out of a run that completed")
    bad = [o for o in overrides if not o.startswith(CHANGEABLE)]
    if bad:
        raise FeditError(f"{', '.join(bad)}: personalization keeps the run's own settings; only [personalize] keys "
                         f"and eval.batch_size can be set here")
    cfg = config_mod.load(run_dir / "config.toml", [*overrides, "eval.test=false"])
    if not cfg.data.client_validation:
        raise FeditError("this run held back no validation split on its clients (data.client_validation = 0), so "
                         "every record was trained on by the federation and none can measure personalization; "
                         "train with data.client_validation = 0.1 (or a count) and personalize that run")
    say = console.print if console is not None else (lambda *a, **k: None)
    prep = runner.prepare(cfg, loaded, run_dir)
    loaded, p, t = prep.loaded, cfg.personalize, cfg.train
    final = load_adapter_file(run_dir / "adapter")
    chosen = federated.select(prep.clients.ids, p.clients, cfg.federation.seed, 0)
    settings = {"personalize": dataclasses.asdict(p), "train": dataclasses.asdict(t)}
    out = run_dir / "personalized"
    rows = []
    for i, cid in enumerate(chosen):
        done = out / f"client_{cid:05d}" / "personalize.json"
        if done.is_file() and json.loads(done.read_text()).get("settings") == settings:
            rows.append(json.loads(done.read_text())["result"])
            continue
        train_ex, val_ex = prep.clients.examples(cid), prep.clients.validation_examples(cid)
        if not val_ex or not train_ex:
            rows.append({"client": cid, "train": len(train_ex), "validation": len(val_ex), "skipped":
                         "no validation record" if not val_ex else "no training record"})
            continue
        say(f"client {cid} ({i + 1}/{len(chosen)}): {len(train_ex)} training, {len(val_ex)} validation records")
        seed = client.seed_for(cfg.federation.seed, 0, cid)  # round 0 is never a training round of the run

        def loss(adapter) -> float:
            return heldout_loss(loaded, val_ex, adapter, cfg.eval.batch_size, t.micro_batch_tokens)["loss"]

        def train(start, **budget) -> dict:
            tcfg = dataclasses.replace(t, **budget)
            return client.train(loaded, FitIns(0, cid, {GLOBAL: start}), train_ex, tcfg, seed)[0].adapter

        # enough passes for personalize.steps steps; max_steps stops it there
        personal = train(final, max_steps=p.steps, local_epochs=math.ceil(p.steps * t.batch_size / len(train_ex)))
        local = train(loaded.initial_adapter, max_steps=0, local_epochs=p.local_epochs)
        save_adapter(loaded.model, personal, out / f"client_{cid:05d}")
        result = {"client": cid, "train": len(train_ex), "validation": len(val_ex),
                  "base": loss(loaded.initial_adapter), "local_only": loss(local), "global": loss(final),
                  "personalized": loss(personal)}
        atomic_write_json(done, {"settings": settings, "result": result})
        rows.append(result)
    scored = [r for r in rows if "skipped" not in r]
    if not scored:
        raise FeditError("no chosen client holds both a training and a validation record; nothing to measure")
    res = {"run": str(run_dir), "settings": settings, "clients": rows, **_counts(scored)}
    atomic_write_json(run_dir / "personalize.json", res)
    atomic_write(run_dir / "personalize.md", markdown(res))
    plot(res, run_dir / "personalize.png")
    say(headline(res))
    say(f"wrote {run_dir / 'personalize.md'}, {run_dir / 'personalize.png'}, {run_dir / 'personalize.json'}; "
        f"personalized adapters in {out}")
    return run_dir


def _counts(rows: list[dict]) -> dict:
    from statistics import median

    return {"measured": len(rows),
            "global_beats_local": sum(r["global"] < r["local_only"] for r in rows),
            "personalized_beats_global": sum(r["personalized"] < r["global"] for r in rows),
            "personalized_beats_local": sum(r["personalized"] < r["local_only"] for r in rows),
            "median_change_global_vs_local": median(r["global"] / r["local_only"] - 1 for r in rows),
            "median_change_personalized_vs_global": median(r["personalized"] / r["global"] - 1 for r in rows)}


def headline(res: dict) -> str:
    n = res["measured"]
    return (f"on their own validation splits: the global adapter beats the client's local-only model for "
            f"{res['global_beats_local']} of {n} clients (median {100 * res['median_change_global_vs_local']:+.1f}%); "
            f"{res['settings']['personalize']['steps']} steps of personalization lower the global adapter's loss for "
            f"{res['personalized_beats_global']} of {n} (median {100 * res['median_change_personalized_vs_global']:+.1f}%)")


def markdown(res: dict) -> str:
    from fedit.evaluation.report import fmt, table

    p = res["settings"]["personalize"]
    rows = [[str(r["client"]), str(r["train"]), str(r["validation"]),
             *([fmt(r[k]) for k in ("base", "local_only", "global", "personalized")] if "skipped" not in r
               else [r["skipped"], "", "", ""])] for r in res["clients"]]
    return "\n".join([
        f"# Personalization of `{res['run']}`", "",
        f"Loss per response token on each client's own validation split (records the federation never trained "
        f"on). local-only: trained from the base model on the client's training split alone for "
        f"{p['local_epochs']:g} pass(es); personalized: the global adapter after {p['steps']} more steps on it.", "",
        headline(res) + ".", "",
        table(["client", "train", "validation", "base", "local-only", "global", "personalized"], rows), "",
        "![personalize](personalize.png)", ""])


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["clients"] if "skipped" not in r]
    x = [r["local_only"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    lo, hi = min(x + [r["personalized"] for r in rows] + [r["global"] for r in rows]), max(
        x + [r["global"] for r in rows] + [r["personalized"] for r in rows])
    pad = (hi - lo) * 0.05 or 0.05
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=1, ls=":", label="as good as local-only")
    for r in rows:
        ax.annotate("", xy=(r["local_only"], r["personalized"]), xytext=(r["local_only"], r["global"]),
                    arrowprops={"arrowstyle": "->", "color": "tab:orange", "lw": 0.8, "alpha": 0.7})
    ax.scatter(x, [r["global"] for r in rows], color="tab:blue", s=24, zorder=3, label="global adapter")
    ax.scatter(x, [r["personalized"] for r in rows], color="tab:orange", marker="x", s=24, zorder=3,
               label=f"personalized ({res['settings']['personalize']['steps']} steps)")
    ax.set_xlabel("local-only model's loss (trained on the client's data alone)")
    ax.set_ylabel("federated model's loss")
    ax.set_title(f"one point per client: below the diagonal, the federation serves it better\n"
                 f"(own validation split; {res['global_beats_local']} of {res['measured']} below)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
