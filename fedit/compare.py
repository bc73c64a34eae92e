"""`fedit compare`: federated algorithms side by side on the same split, against Centralized and the base model.

Every listed strategy trains on the same Dirichlet split, from the same seeded LoRA init, with
the same client selection (seeded by (seed, round) alone) and the same local budget; only the
algorithm and its options differ. Centralized (one epoch on all the training records) and the
untuned base model are the reference lines. The held-out set is large enough to resolve the
differences it reports (50 records per category at the small scale) and is scored at an
evaluation-only cutoff that leaves every category response tokens (eval.cutoff_len), every
round. Next to each strategy's gap to Centralized stands a 95% paired bootstrap interval over
the held-out records: the same resampled records score the strategy and Centralized.

A rerun with the same --out reuses finished runs and resumes unfinished ones (as reproduce).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from fedit import config as config_mod
from fedit.checkpoint import atomic_write, atomic_write_json
from fedit.config import Config
from fedit.errors import FeditError
from fedit.reproduce import DEFAULT_DATA, Scale, build_data, method_config, train_or_reuse
from fedit.evaluation import report

SCALES = {
    "smoke": Scale(
        "smoke", "CI check: every strategy for 2 rounds on a few records (minutes on 2 CPU cores)",
        records=200, test_per_category=5, clients=4, min_client_size=5,
        config={"federation": {"rounds": 2, "clients_per_round": 2},
                "train": {"batch_size": 8, "micro_batch_size": 4, "lr": 1e-3, "cutoff_len": 128},
                "eval": {"batch_size": 8, "cutoff_len": 256}}),
    "small": Scale(
        "small", "the algorithms on Dolly with SmolLM2-135M: 1,000 training records over 20 Dirichlet clients, "
                 "5 rounds x 4 clients (one pass in all, as Centralized's epoch), 400 held-out records scored at "
                 "cutoff 512 after every round; about 20 minutes per strategy on 2 CPU cores",
        records=1400, test_per_category=50, clients=20, min_client_size=20,
        config={"federation": {"rounds": 5, "clients_per_round": 4},
                # micro-batches of 8 at cutoff 256 stay small: no token bound (as when its first runs were made)
                "train": {"batch_size": 16, "micro_batch_size": 8, "lr": 5e-4, "cutoff_len": 256,
                          "micro_batch_tokens": 0},
                "eval": {"batch_size": 8, "cutoff_len": 512}}),
}
BOOTSTRAP = 2000  # resamples of the held-out records for each interval


def parse_sets(sets: list[str], strategies: list[str]) -> dict[str, list[str]]:
    """``fedprox:strategy.proximal_mu=0.1`` -> {"fedprox": ["strategy.proximal_mu=0.1"]}."""
    out: dict[str, list[str]] = {s: [] for s in strategies}
    for text in sets:
        name, sep, override = text.partition(":")
        if not sep or "=" not in override:
            raise FeditError(f"--set {text!r} must look like STRATEGY:section.key=value, e.g. "
                             f"fedprox:strategy.proximal_mu=0.1")
        if name not in out:
            raise FeditError(f"--set {text!r}: {name!r} is not among --strategies ({', '.join(strategies)})")
        out[name].append(override)
    return out


def parse_entries(entries: list[str]) -> dict[str, str]:
    """``fedavg`` or ``LABEL=STRATEGY`` each -> {label: strategy}: one strategy may run as several
    labelled variants (their --set overrides differ), each in its own run directory."""
    import re

    out: dict[str, str] = {}
    for entry in entries:
        label, _, strategy = entry.rpartition("=")
        label = label or strategy
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", label):
            raise FeditError(f"--strategies: {label!r} is not a usable name (letters, digits, _ . -)")
        if label in out:
            raise FeditError(f"--strategies {','.join(entries)} names {label!r} twice")
        out[label] = strategy
    return out


def strategy_configs(scale: Scale, strategies: list[str], config_file: str | None, overrides: list[str],
                     sets: list[str]) -> tuple[Config, dict[str, Config]]:
    """(the shared config, each entry's config, by label); every problem of every entry reported at once."""
    from fedit.strategies import STRATEGIES

    entries = parse_entries(strategies)
    unknown = [s for s in entries.values() if s not in STRATEGIES]
    if unknown or not strategies:
        raise FeditError(f"--strategies {','.join(strategies)}: "
                         + (f"unknown {', '.join(unknown)}; " if unknown else "none given; ")
                         + f"choose from {', '.join(STRATEGIES)}")
    per = parse_sets(sets, list(entries))
    base = config_mod.load(config_file, overrides, base=scale.config, base_name=f"the compare {scale.name} scale")
    configs, problems = {}, []
    for label, name in entries.items():
        try:
            configs[label] = config_mod.load(config_file, [*overrides, f"federation.strategy={name}", *per[label]],
                                             base=scale.config, base_name=f"{label} at the compare {scale.name} scale")
        except FeditError as e:
            problems.append(str(e))
    if problems:
        raise FeditError("\n".join(problems))
    return base, configs


def compare(scale_name: str, strategies: list[str], data: str = DEFAULT_DATA, out: str | None = None,
            config_file: str | None = None, overrides: list[str] | tuple[str, ...] = (), sets: list[str] = (),
            console=None) -> Path:
    from fedit.data.records import load_records
    from fedit.model import attach_lora, load_base

    if scale_name not in SCALES:
        raise FeditError(f"--scale {scale_name!r}: choose one of {', '.join(SCALES)}")
    scale = SCALES[scale_name]
    cfg, configs = strategy_configs(scale, strategies, config_file, list(overrides), list(sets))
    say = console.print if console is not None else (lambda *a, **k: None)
    out_dir = Path(out or f"runs/compare-{scale_name}")
    started = time.perf_counter()
    ds = build_data(load_records(data), scale, cfg.federation.seed, out_dir)
    say(f"data: {ds.sizes['fedit']['examples']} training records over {ds.sizes['fedit']['clients']} clients; "
        f"{scale.test_per_category} held-out records per category in {ds.test_file}")
    loaded = load_base(cfg.model)
    attach_lora(loaded, cfg.lora, cfg.federation.seed)
    runs = out_dir / "runs"
    strategies = list(configs)  # the labels
    names = ["centralized", *strategies]
    for name in names:
        if name == "centralized":
            mcfg = method_config(cfg, "centralized", ds, runs)
        else:
            mcfg = method_config(configs[name], "fedit", ds, runs).replace(run={"out": str(runs / name)})
        # a variant with its own LoRA or model settings loads its own model (the shared one has the
        # shared LoRA attached); the same seed makes the same init where the settings agree
        same = mcfg.lora == cfg.lora and mcfg.model == cfg.model
        train_or_reuse(name, mcfg, runs / name, out_dir, loaded if same else None, console,
                       f"{ds.sizes['centralized']['examples']} records, 1 epoch" if name == "centralized" else
                       f"{mcfg.federation.rounds} rounds x {mcfg.federation.clients_per_round} clients")
    result = summarise(runs, strategies, configs, scale, data, time.perf_counter() - started,
                       parse_sets(list(sets), strategies))
    atomic_write_json(out_dir / "compare.json", result)
    atomic_write(out_dir / "compare.md", markdown(result))
    plot(result, out_dir / "compare.png")
    say(f"wrote {out_dir / 'compare.md'}, {out_dir / 'compare.png'}, {out_dir / 'compare.json'}")
    return out_dir


# ---------------------------------------------------------------- numbers

def _rounds(run_dir: Path) -> list[dict]:
    from fedit import server

    return [r for r in server.RunDir(run_dir).events("round") if "eval" in r]


def bootstrap_gap(ours: list, ref: list, seed: int = 0, n: int = BOOTSTRAP) -> tuple[float, float, float]:
    """Relative gap (ours − ref) / ref of the token-mean loss, and its 95% paired bootstrap interval.

    ``ours`` and ``ref`` hold [loss sum, tokens] per held-out record, in the same order; a resample
    draws records (with their tokens) and scores both models on the same draw."""
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    keep = b[:, 1] > 0  # records without a scored token carry no information
    a, b = a[keep], b[keep]
    gap = a[:, 0].sum() / a[:, 1].sum() / (b[:, 0].sum() / b[:, 1].sum()) - 1
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n, len(a)))
    la = a[idx, 0].sum(1) / a[idx, 1].sum(1)
    lb = b[idx, 0].sum(1) / b[idx, 1].sum(1)
    lo, hi = np.percentile(la / lb - 1, [2.5, 97.5])
    return float(gap), float(lo), float(hi)


def summarise(runs: Path, strategies: list[str], configs: dict[str, Config], scale: Scale, data: str,
              seconds: float, sets: dict[str, list[str]] | None = None) -> dict:
    from fedit import server

    central = _rounds(runs / "centralized")
    base, central_final = central[0]["eval"], central[-1]["eval"]
    rows = {}
    fedavg = _rounds(runs / "fedavg")[-1]["eval"] if "fedavg" in strategies else None
    for name in strategies:
        rounds = _rounds(runs / name)
        final = rounds[-1]["eval"]
        gap, lo, hi = bootstrap_gap(final["examples"], central_final["examples"])
        # the question a researcher asks: did it beat FedAvg? (paired on the same records)
        vs = bootstrap_gap(final["examples"], fedavg["examples"]) if fedavg and name != "fedavg" else None
        clients = server.RunDir(runs / name).events("client")
        done = [r for r in rounds if r["round"] > 0]
        rows[name] = {
            "strategy": configs[name].federation.strategy,
            "options": dataclasses.asdict(configs[name].strategy),
            "settings": (sets or {}).get(name, []),
            "bytes_per_client_by_rank": {str(r): t["bytes_down"] + t["bytes_up"]
                                         for r, t in server.traffic_by_rank(clients).items()},
            "curve": [[r["round"], r["eval"]["loss"]] for r in rounds],
            "loss": final["loss"], "by_category": final["by_category"],
            "gap": gap, "gap_low": lo, "gap_high": hi,
            "vs_fedavg": list(vs) if vs else None,
            "vs_fedavg_by_category": {c: v / fedavg["by_category"][c] - 1 for c, v in final["by_category"].items()
                                      if c in fedavg["by_category"]} if vs else None,
            "vs_base": final["loss"] / base["loss"] - 1,
            "bytes_per_round": sum((c.get("bytes_down") or 0) + (c.get("bytes_up") or 0) for c in clients
                                   if c.get("accepted")) / max(1, len(done)),
            "train_seconds": round(sum(c.get("metrics", {}).get("seconds", 0.0) for c in clients), 1),
        }
    return {"scale": scale.name, "data": data, "test_records": len(central_final["examples"]),
            "test_per_category": scale.test_per_category, "config": configs[strategies[0]].to_dict(),
            "base": {"loss": base["loss"], "by_category": base["by_category"]},
            "centralized": {"loss": central_final["loss"], "by_category": central_final["by_category"]},
            "strategies": rows, "seconds": round(seconds, 1)}


def markdown(res: dict) -> str:
    cats = sorted(res["base"]["by_category"])
    short = {c: c.replace("_", " ") for c in cats}
    vs_head = ["vs FedAvg (95% CI)"] if any(r["vs_fedavg"] for r in res["strategies"].values()) else []
    head = ["method", "held-out loss", "gap to Centralized (95% CI)", *vs_head, *[short[c] for c in cats],
            "MB per round"]
    pad = [""] * len(vs_head)
    ci = lambda g, lo, hi: f"{100 * g:+.2f}% ({100 * lo:+.2f}, {100 * hi:+.2f})"  # noqa: E731
    rows = [["base (untuned)", report.fmt(res["base"]["loss"]), "", *pad,
             *[report.fmt(res["base"]["by_category"][c], 3) for c in cats], ""],
            ["centralized", report.fmt(res["centralized"]["loss"]), "", *pad,
             *[report.fmt(res["centralized"]["by_category"].get(c, float("nan")), 3) for c in cats], ""]]
    for name, r in res["strategies"].items():
        vs = [ci(*r["vs_fedavg"]) if r["vs_fedavg"] else ""] if vs_head else []
        rows.append([name, report.fmt(r["loss"]), ci(r["gap"], r["gap_low"], r["gap_high"]), *vs,
                     *[report.fmt(r["by_category"].get(c, float("nan")), 3) for c in cats],
                     f"{r['bytes_per_round'] / 2**20:.1f}"])
    c = res["config"]
    opts = [f"- {n}" + (f" ({r['strategy']})" if r.get("strategy", n) != n else "") + ": "
            + (", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}" for k, v in r["options"].items())
               or "no options")
            + "".join(f"; {s}" for s in r.get("settings", []))
            + ("; MB per client and round by LoRA rank: " + ", ".join(
                f"r={k}: {v / 2**20:.2f}" for k, v in r["bytes_per_client_by_rank"].items())
               if len(r.get("bytes_per_client_by_rank") or {}) > 1 else "")
            for n, r in res["strategies"].items()]
    return "\n".join([
        f"# Federated algorithms compared ({res['scale']} scale)", "",
        f"Data `{res['data']}`; {res['test_records']} held-out records ({res['test_per_category']} per category) "
        f"scored at cutoff {c['eval']['cutoff_len'] or c['train']['cutoff_len']} after every round; "
        f"{c['federation']['rounds']} rounds x {c['federation']['clients_per_round']} clients, batch "
        f"{c['train']['batch_size']}, lr {c['train']['lr']:g}, training cutoff {c['train']['cutoff_len']}, "
        f"LoRA r={c['lora']['r']}; seed {c['federation']['seed']}; total {res['seconds'] / 60:.1f} min.", "",
        "Held-out loss per response token after the last round (lower is better); the gaps are relative to "
        "Centralized and to FedAvg (negative: lower loss than it), each with a 95% paired bootstrap interval "
        "over the held-out records.", "",
        report.table(head, rows), "", "Options and settings each run had:", "", *opts, "",
        "Held-out loss per round: ![compare](compare.png)", ""])


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.8))
    cmap = plt.get_cmap("tab10")
    for i, (name, r) in enumerate(res["strategies"].items()):
        xs, ys = zip(*r["curve"])
        ax.plot(xs, ys, marker="o", ms=3, lw=1.8, color=cmap(i % 10), label=name)
    ax.axhline(res["centralized"]["loss"], color="black", ls="--", lw=1.2, label="centralized (1 epoch)")
    ax.axhline(res["base"]["loss"], color="grey", ls=":", lw=1.2, label="base model")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = base model)")
    ax.set_ylabel("held-out loss per response token")
    ax.set_title(f"fedit compare --scale {res['scale']}: {res['test_records']} held-out records")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
