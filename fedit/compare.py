"""`fedit compare`: federated algorithms side by side on the same split, against Centralized and the base model.

Every listed strategy trains on the same split (Dirichlet over categories; data.scheme = "iid" and the
other schemes of `fedit partition` take the same held-out records), from the same seeded LoRA init, with
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
import json
import time
from pathlib import Path

import numpy as np

from fedit import config as config_mod
from fedit import selection
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
            console=None, grids: list[str] = (), select: bool = False, seeds: list[int] = (),
            test_rounds: str = "all") -> Path:
    from fedit.data.records import load_records
    from fedit.model import attach_lora, load_base

    if scale_name not in SCALES:
        raise FeditError(f"--scale {scale_name!r}: choose one of {', '.join(SCALES)}")
    scale = SCALES[scale_name]
    if test_rounds not in ("all", "last"):
        raise FeditError(f"--test-rounds {test_rounds!r}: choose all or last")
    if test_rounds != "all" and not select:
        raise FeditError("--test-rounds last is for --select, which scores the test split after training; without "
                         "it every run scores the test split as it trains (eval.every)")
    if seeds:
        return compare_seeds(scale_name, strategies, data, out, config_file, list(overrides), list(sets), console,
                             list(grids), select, list(seeds), test_rounds)
    if select:
        return compare_selected(scale, strategies, data, out, config_file, list(overrides), list(sets), list(grids),
                                console, test_rounds)
    if grids:
        raise FeditError("--grid gives the options --select chooses among on validation; add --select (or give one "
                         "value per option with --set)")
    cfg, configs = strategy_configs(scale, strategies, config_file, list(overrides), list(sets))
    say = console.print if console is not None else (lambda *a, **k: None)
    out_dir = Path(out or f"runs/compare-{scale_name}")
    started = time.perf_counter()
    ds = build_data(load_records(data), scale, cfg.federation.seed, out_dir, cfg.data.scheme, cfg.data.alpha)
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
                       parse_sets(list(sets), strategies), ds.test_file)
    atomic_write_json(out_dir / "compare.json", result)
    atomic_write(out_dir / "compare.md", markdown(result))
    plot(result, out_dir / "compare.png")
    say(f"wrote {out_dir / 'compare.md'}, {out_dir / 'compare.png'}, {out_dir / 'compare.json'}")
    return out_dir


# ---------------------------------------------------------------- several seeds

def compare_seeds(scale_name: str, strategies: list[str], data: str, out: str | None, config_file: str | None,
                  overrides: list[str], sets: list[str], console, grids: list[str], select: bool,
                  seeds: list[int], test_rounds: str = "all") -> Path:
    """The whole comparison once per seed (the split, the LoRA init, the selection, the data order and the
    validation split all follow it: federation.seed and data.seed), then the spread over seeds beside each
    seed's bootstrap interval (which covers the test records only)."""
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise FeditError(f"--seeds {','.join(map(str, seeds))}: give distinct whole numbers >= 0")
    say = console.print if console is not None else (lambda *a, **k: None)
    out_dir = Path(out or f"runs/compare-{scale_name}{'-select' if select else ''}-seeds")
    per_seed = {}
    for seed in seeds:
        say(f"seed {seed} ({len(per_seed) + 1} of {len(seeds)})")
        d = compare(scale_name, strategies, data, str(out_dir / f"seed-{seed}"), config_file,
                    [*overrides, f"federation.seed={seed}", f"data.seed={seed}"], sets, console, grids, select,
                    test_rounds=test_rounds)
        per_seed[seed] = json.loads((d / "compare.json").read_text())
    result = over_seeds(per_seed)
    atomic_write_json(out_dir / "compare-seeds.json", result)
    atomic_write(out_dir / "compare-seeds.md", markdown_seeds(result))
    say(f"wrote {out_dir / 'compare-seeds.md'}, {out_dir / 'compare-seeds.json'} (each seed's in seed-N/)")
    return out_dir


def _spread(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max()), "values": [float(v) for v in arr]}


def over_seeds(per_seed: dict[int, dict]) -> dict:
    """Per strategy: test loss, gap to Centralized and to FedAvg over the seeds (mean, sd, min, max), how many
    seeds' intervals lie wholly below or above zero, and the same per category against FedAvg."""
    runs = list(per_seed.values())
    labels = list(runs[0]["strategies"])
    rows = {}
    for label in labels:
        rs = [res["strategies"][label] for res in runs]
        row = {"loss": _spread([r["loss"] for r in rs]), "gap": _spread([r["gap"] for r in rs]),
               "gap_intervals": [[r["gap_low"], r["gap_high"]] for r in rs]}
        if all(r.get("vs_fedavg") for r in rs):
            row["vs_fedavg"] = _spread([r["vs_fedavg"][0] for r in rs])
            row["vs_fedavg_below"] = sum(r["vs_fedavg"][2] < 0 for r in rs)  # lower loss than FedAvg, CI excludes 0
            row["vs_fedavg_above"] = sum(r["vs_fedavg"][1] > 0 for r in rs)
            cats = sorted(set.intersection(*(set(r["vs_fedavg_by_category"]) for r in rs)))
            row["vs_fedavg_by_category"] = {c: {**_spread([r["vs_fedavg_by_category"][c][0] for r in rs]),
                                                "below": sum(r["vs_fedavg_by_category"][c][2] < 0 for r in rs),
                                                "above": sum(r["vs_fedavg_by_category"][c][1] > 0 for r in rs)}
                                            for c in cats}
        if "selected" in rs[0]:
            row["selected"] = [r["selected"] for r in rs]
        rows[label] = row
    return {"seeds": list(per_seed), "scale": runs[0]["scale"], "data": runs[0]["data"],
            "test_records": runs[0]["test_records"], "strategies": rows,
            "centralized": _spread([res["centralized"]["loss"] for res in runs]),
            "base": _spread([res["base"]["loss"] for res in runs])}


def markdown_seeds(res: dict) -> str:
    pm = lambda s, pct=False: (f"{100 * s['mean']:+.2f}% ± {100 * s['sd']:.2f}" if pct  # noqa: E731
                               else f"{s['mean']:.4f} ± {s['sd']:.4f}")
    n = len(res["seeds"])
    chosen = any("selected" in r for r in res["strategies"].values())  # --select: each seed chose on its validation
    option = lambda name: name.split("__", 1)[1] if "__" in name else "(its defaults)"  # noqa: E731
    blank = [""] if chosen else []  # no option column without --select
    rows = [["base (untuned)", pm(res["base"]), "", "", *blank],
            ["centralized", pm(res["centralized"]), "", "", *blank]]
    for label, r in res["strategies"].items():
        vs = (f"{pm(r['vs_fedavg'], True)} (below in {r['vs_fedavg_below']}, above in {r['vs_fedavg_above']} of {n})"
              if "vs_fedavg" in r else "")
        rows.append([label, pm(r["loss"]), pm(r["gap"], True), vs,
                     *([", ".join(option(x) for x in r.get("selected", []))] if chosen else [])])
    cat_lines = []
    for label, r in res["strategies"].items():
        for c, v in (r.get("vs_fedavg_by_category") or {}).items():
            if v["below"] == n or v["above"] == n:  # only what every seed's interval separates from zero
                cat_lines.append(f"- {label}, {c.replace('_', ' ')}: {pm(v, True)} against FedAvg, "
                                 f"{'below' if v['below'] == n else 'above'} zero in every seed's interval")
    return "\n".join([
        f"# Federated algorithms over {n} seeds ({res['scale']} scale)", "",
        f"Data `{res['data']}`, {res['test_records']} test records; seeds {', '.join(map(str, res['seeds']))}: "
        f"each seed draws its own split, LoRA init, client selection, data order and validation split. Mean ± "
        f"standard deviation over the seeds; 'below in k of {n}': the seeds whose 95% paired bootstrap interval "
        f"(over the test records) lies wholly below zero (lower loss than FedAvg).", "",
        report.table(["method", "test loss", "gap to Centralized", "vs FedAvg",
                      *(["option chosen on validation, per seed"] if chosen else [])], rows), "",
        "Per-category differences against FedAvg that every seed's interval separates from zero:", "",
        *(cat_lines or ["- none"]), "",
        "Each seed's own tables: seed-N/compare.md.", ""])


# ---------------------------------------------------------------- options chosen on validation

def compare_selected(scale: Scale, strategies: list[str], data: str, out: str | None, config_file: str | None,
                     overrides: list[str], sets: list[str], grids: list[str], console,
                     test_rounds: str = "all") -> Path:
    """`fedit compare --select`: every candidate of every strategy's grid trained with no test data at the server,
    each strategy's option chosen on federated validation loss and written down, then (only then) the chosen
    runs and Centralized scored on the test split (fedit/selection.py)."""
    from fedit.data.records import load_records
    from fedit.model import attach_lora, load_base

    cfg, configs = strategy_configs(scale, strategies, config_file, overrides, sets)
    entries, per = parse_entries(strategies), parse_sets(sets, list(configs))
    grid = selection.parse_grids(grids, list(configs))
    amount = cfg.data.client_validation or 0.1
    say = console.print if console is not None else (lambda *a, **k: None)
    candidates: dict[str, dict[str, tuple[list[str], Config]]] = {}
    problems = []
    for label, name in entries.items():
        for point in grid[label]:
            try:  # the server reads no test data; each round's figure is the clients' validation loss
                c = config_mod.load(config_file, [*overrides, f"federation.strategy={name}", *per[label], *point,
                                                  "eval.test=false", f"data.client_validation={amount}"],
                                    base=scale.config, base_name=f"{label} at the compare {scale.name} scale")
                candidates.setdefault(label, {})[selection.candidate_name(label, point)] = (point, c)
            except FeditError as e:
                problems.append(str(e))
    if problems:
        raise FeditError("\n".join(problems))
    out_dir = Path(out or f"runs/compare-{scale.name}-select")
    started = time.perf_counter()
    ds = build_data(load_records(data), scale, cfg.federation.seed, out_dir, cfg.data.scheme, cfg.data.alpha)
    central_data = selection.training_union(ds.fedit, amount, cfg.data.seed, out_dir / "data" / "centralized-train")
    say(f"data: {ds.sizes['fedit']['examples']} training records over {ds.sizes['fedit']['clients']} clients, each "
        f"holding back {amount:g} of its records for validation; the test split ({ds.test_file}) is read only "
        f"after every choice is written")
    loaded = load_base(cfg.model)
    attach_lora(loaded, cfg.lora, cfg.federation.seed)
    runs = out_dir / "runs"
    ccfg = cfg.replace(data={"clients_dir": str(central_data), "test_file": "", "client_validation": 0},
                       eval={"every": 0}, run={"out": str(runs / "centralized")},
                       federation={"rounds": 1, "clients_per_round": 1, "fraction": 0.0}, train={"local_epochs": 1.0})
    train_or_reuse("centralized", ccfg, runs / "centralized", out_dir, loaded, console,
                   "the clients' training splits, 1 epoch")
    for label, cands in candidates.items():
        for name, (point, c) in cands.items():
            mcfg = method_config(c, "fedit", ds, runs).replace(run={"out": str(runs / name)})
            same = mcfg.lora == cfg.lora and mcfg.model == cfg.model
            train_or_reuse(name, mcfg, runs / name, out_dir, loaded if same else None, console,
                           f"{mcfg.federation.rounds} rounds x {mcfg.federation.clients_per_round} clients"
                           + (f", {', '.join(point)}" if point else ""))
    # the choice, on validation alone, written down before the test split is opened
    chosen = {}
    for label, cands in candidates.items():
        val = {name: _final_validation(runs / name) for name in cands}
        chosen[label] = {"selected": selection.choose(val), "validation": val,
                         "grid": {name: point for name, (point, _) in cands.items()}}
    atomic_write_json(out_dir / "selection.json", {
        "on": f"federated validation loss after the last round ({amount:g} of each client's records)",
        "strategies": chosen})
    say("chosen on validation: " + "; ".join(f"{label}: {c['selected']}" for label, c in chosen.items()))
    result = _score_selected(out_dir, runs, ds.test_file, loaded, cfg, candidates, chosen, scale, data, amount,
                             every_round=test_rounds == "all")
    result["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(out_dir / "compare.json", result)
    atomic_write(out_dir / "compare.md", markdown_selected(result))
    plot_selected(result, out_dir / "compare.png")
    say(f"wrote {out_dir / 'compare.md'}, {out_dir / 'compare.png'}, {out_dir / 'compare.json'}, "
        f"{out_dir / 'selection.json'}")
    return out_dir


def _final_validation(run_dir: Path) -> float:
    from fedit import server

    rows = server.RunDir(run_dir).events("round")
    v = rows[-1].get("validation", {}) if rows else {}
    if "loss" not in v:
        raise FeditError(f"{run_dir}: its last round has no federated validation loss; it cannot be chosen on")
    return v["loss"]


def _score_selected(out_dir: Path, runs: Path, test_file: Path, loaded, cfg: Config, candidates: dict, chosen: dict,
                    scale: Scale, data: str, amount, every_round: bool = True) -> dict:
    """Test figures, after the choice: base, Centralized, each chosen run per round (or, without
    ``every_round``, its last round alone: one test pass per run instead of one per round), every candidate's
    last round (for the record: how the choice on validation compares with what the test split would have
    said)."""
    import hashlib

    from fedit import server
    from fedit.adapter import load_adapter_file
    from fedit.data.batches import tokenize
    from fedit.data.records import load_records
    from fedit.evaluation.heldout import heldout_loss

    t = cfg.train
    test = tokenize(load_records(test_file).records, loaded.tokenizer, cfg.eval.cutoff_len or t.cutoff_len,
                    t.train_on_inputs, cfg.data.template)
    categories = [e.category for e in test]
    cache_file = out_dir / "test_scores.json"
    test_sha = hashlib.sha256(test_file.read_bytes()).hexdigest()
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    if cache.get("test_sha256") != test_sha:  # scores of another test split are not these
        cache = {"test_sha256": test_sha}

    def score(adapter_dir: Path | None) -> dict:
        adapter = load_adapter_file(adapter_dir) if adapter_dir else loaded.initial_adapter
        key = "base" if adapter_dir is None else hashlib.sha256(
            (adapter_dir / "adapter_model.safetensors").read_bytes()).hexdigest()
        if key not in cache:  # a rerun with the same --out scores nothing twice
            cache[key] = heldout_loss(loaded, test, adapter, cfg.eval.batch_size, t.micro_batch_tokens)
            atomic_write_json(cache_file, cache)
        return cache[key]

    base, central = score(None), score(runs / "centralized" / "adapter")
    final = {name: score(runs / name / "adapter") for cands in candidates.values() for name in cands}
    fedavg = final.get(chosen.get("fedavg", {}).get("selected"))
    rows = {}
    for label, c in chosen.items():
        name = c["selected"]
        rd = server.RunDir(runs / name)
        val_curve = [[r, e["loss"]] for r, e in server.loss_curve(rd, "validation")]
        test_curve = [[r, score(rd.round_dir(r))["loss"]] for r, _ in val_curve] if every_round else \
            [[val_curve[-1][0], final[name]["loss"]]]
        point, mcfg = candidates[label][name]
        rows[label] = {
            "strategy": mcfg.federation.strategy, "selected": name, "settings": point,
            "options": dataclasses.asdict(mcfg.strategy), "validation": c["validation"][name],
            "candidates": {n: {"settings": c["grid"][n], "validation": v, "test": final[n]["loss"]}
                           for n, v in c["validation"].items()},
            "validation_curve": val_curve, "curve": test_curve,
            "rounds_tau": selection.kendall_tau([v for _, v in val_curve], [x for _, x in test_curve])
            if every_round else None,
            **scored(final[name], central, fedavg if label != "fedavg" else None, base, categories),
            **traffic(rd.events("client"), len(val_curve) - 1),
        }
    every = [(v, final[n]["loss"]) for c in chosen.values() for n, v in c["validation"].items()]
    return {"mode": "select", "test_rounds": "all" if every_round else "last", "scale": scale.name, "data": data,
            "test_records": len(test),
            "test_per_category": scale.test_per_category, "client_validation": amount,
            "config": cfg.to_dict(),
            "base": {"loss": base["loss"], "by_category": base["by_category"]},
            "centralized": {"loss": central["loss"], "by_category": central["by_category"]},
            "strategies": rows,
            "strategies_tau": selection.kendall_tau([r["validation"] for r in rows.values()],
                                                    [r["loss"] for r in rows.values()]),
            "candidates_tau": selection.kendall_tau([v for v, _ in every], [x for _, x in every])}


def markdown_selected(res: dict) -> str:
    per_round = res.get("test_rounds", "all") == "all"  # scored after every round (older results: all)
    cats = sorted(res["base"]["by_category"])
    ci = lambda g, lo, hi: f"{100 * g:+.2f}% ({100 * lo:+.2f}, {100 * hi:+.2f})"  # noqa: E731
    tau = lambda x: "n/a" if x is None else f"{x:+.2f}"  # noqa: E731
    has_vs = any(r["vs_fedavg"] for r in res["strategies"].values())
    head = ["method", "chosen option", "validation loss", "test loss", "gap to Centralized (95% CI)",
            *(["vs FedAvg (95% CI)"] if has_vs else []), *[c.replace("_", " ") for c in cats]]
    rows = [["base (untuned)", "", "", report.fmt(res["base"]["loss"]), "", *([""] if has_vs else []),
             *[report.fmt(res["base"]["by_category"][c], 3) for c in cats]],
            ["centralized", "", "", report.fmt(res["centralized"]["loss"]), "", *([""] if has_vs else []),
             *[report.fmt(res["centralized"]["by_category"].get(c, float("nan")), 3) for c in cats]]]
    for label, r in res["strategies"].items():
        rows.append([label, ", ".join(s.split(".", 1)[1] for s in r["settings"]) or "(its defaults)",
                     report.fmt(r["validation"]), report.fmt(r["loss"]), ci(r["gap"], r["gap_low"], r["gap_high"]),
                     *([ci(*r["vs_fedavg"]) if r["vs_fedavg"] else ""] if has_vs else []),
                     *[report.fmt(r["by_category"].get(c, float("nan")), 3) for c in cats]])
    cand_rows = [[label, ", ".join(s.split(".", 1)[1] for s in v["settings"]) or "(its defaults)",
                  report.fmt(v["validation"]), report.fmt(v["test"]), "chosen" if n == r["selected"] else ""]
                 for label, r in res["strategies"].items() for n, v in r["candidates"].items()]
    c = res["config"]
    return "\n".join([
        f"# Federated algorithms compared, options chosen on validation ({res['scale']} scale)", "",
        f"Data `{res['data']}`; {c['federation']['rounds']} rounds x {c['federation']['clients_per_round']} "
        f"clients, batch {c['train']['batch_size']}, lr {c['train']['lr']:g}, LoRA r={c['lora']['r']}, seed "
        f"{c['federation']['seed']}. Each client held back {res['client_validation']:g} of its records for "
        f"validation; every candidate trained with no test data at the server, and each strategy's option was "
        f"chosen by the clients' federated validation loss after the last round (selection.json) before the "
        f"{res['test_records']} test records ({res['test_per_category']} per category) were read. Centralized "
        f"trained {central_label(res)} on the clients' training splits. This invocation took "
        f"{res['seconds'] / 60:.1f} min (a rerun reuses the runs that finished).", "",
        report.table(head, rows), "",
        *category_table(res),
        "Every candidate (the test column was computed after the choice and chose nothing):", "",
        report.table(["strategy", "option", "validation loss", "test loss", ""], cand_rows), "",
        f"Do validation and test agree? Kendall τ between the two losses (1: the same order): over the chosen "
        f"strategies {tau(res['strategies_tau'])}, over every candidate {tau(res['candidates_tau'])}"
        + (", over the rounds of each chosen run: " + ", ".join(f"{label} {tau(r['rounds_tau'])}"
                                                              for label, r in res["strategies"].items())
           if per_round else "; the test split was scored after the last round only (--test-rounds last)") + ".",
        "",
        "Loss per round, validation (left) and test (right, scored after the choice): ![compare](compare.png)", ""])


def category_table(res: dict) -> list[str]:
    """Each strategy against FedAvg per category, with the paired bootstrap interval on that category's records."""
    rows = [(label, r["vs_fedavg_by_category"]) for label, r in res["strategies"].items() if r.get("vs_fedavg_by_category")]
    if not rows:
        return []
    cats = sorted({c for _, v in rows for c in v})
    cell = lambda g: f"{100 * g[0]:+.2f}% ({100 * g[1]:+.2f}, {100 * g[2]:+.2f})" if g else ""  # noqa: E731
    return ["Against FedAvg per category (95% paired bootstrap interval on that category's test records; an interval "
            "that holds 0 shows no difference):", "",
            report.table(["method", *[c.replace("_", " ") for c in cats]],
                         [[label, *[cell(v.get(c)) for c in cats]] for label, v in rows]), ""]


def central_label(res: dict) -> str:
    """How long Centralized trained: one epoch, cut at train.max_steps where that override capped it."""
    n = res["config"]["train"]["max_steps"]
    return f"1 epoch, at most {n} steps" if n else "1 epoch"


def plot_selected(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    cmap = plt.get_cmap("tab10")
    for ax, key, title in ((axes[0], "validation_curve", "validation (federated): what chose"),
                           (axes[1], "curve", f"test ({res['test_records']} records): scored after the choice")):
        for i, (name, r) in enumerate(res["strategies"].items()):
            xs, ys = zip(*r[key])
            ax.plot(xs, ys, marker="o", ms=3, lw=1.8, color=cmap(i % 10), label=name)
        if key == "curve":
            ax.axhline(res["centralized"]["loss"], color="black", ls="--", lw=1.2,
                       label=f"centralized ({central_label(res)})")
            ax.axhline(res["base"]["loss"], color="grey", ls=":", lw=1.2, label="base model")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round (0 = base model)")
        ax.set_ylabel("loss per response token")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
              seconds: float, sets: dict[str, list[str]] | None = None, test_file: Path | None = None) -> dict:
    from fedit import server

    categories = test_categories(test_file or runs.parent / "data" / "fedit" / "test.jsonl")
    central = _rounds(runs / "centralized")
    base, central_final = central[0]["eval"], central[-1]["eval"]
    rows = {}
    fedavg = _rounds(runs / "fedavg")[-1]["eval"] if "fedavg" in strategies else None
    for name in strategies:
        rounds = _rounds(runs / name)
        final = rounds[-1]["eval"]
        clients = server.RunDir(runs / name).events("client")
        rows[name] = {
            "strategy": configs[name].federation.strategy,
            "options": dataclasses.asdict(configs[name].strategy),
            "settings": (sets or {}).get(name, []),
            "curve": [[r["round"], r["eval"]["loss"]] for r in rounds],
            **scored(final, central_final, fedavg if name != "fedavg" else None, base, categories),
            **traffic(clients, len([r for r in rounds if r["round"] > 0])),
        }
    return {"scale": scale.name, "data": data, "test_records": len(central_final["examples"]),
            "test_per_category": scale.test_per_category, "config": configs[strategies[0]].to_dict(),
            "base": {"loss": base["loss"], "by_category": base["by_category"]},
            "centralized": {"loss": central_final["loss"], "by_category": central_final["by_category"]},
            "strategies": rows, "seconds": round(seconds, 1)}


def scored(final: dict, central: dict, fedavg: dict | None, base: dict, categories: list[str]) -> dict:
    """A run's test figures against Centralized and FedAvg, each gap with its paired bootstrap interval, per
    category too (``categories``: each test record's, in the order of the per-record sums)."""
    gap, lo, hi = bootstrap_gap(final["examples"], central["examples"])
    # the question a researcher asks: did it beat FedAvg? (paired on the same records)
    vs = bootstrap_gap(final["examples"], fedavg["examples"]) if fedavg else None
    return {"loss": final["loss"], "by_category": final["by_category"], "gap": gap, "gap_low": lo, "gap_high": hi,
            "vs_fedavg": list(vs) if vs else None,
            "vs_fedavg_by_category": by_category_gaps(final["examples"], fedavg["examples"], categories)
            if vs else None,
            "vs_base": final["loss"] / base["loss"] - 1}


def by_category_gaps(ours: list, ref: list, categories: list[str]) -> dict[str, list[float]]:
    """Category -> [gap, low, high]: the paired bootstrap interval of the relative gap on that category's records."""
    out = {}
    for c in sorted(set(categories)):
        idx = [i for i, x in enumerate(categories) if x == c]
        if any(ref[i][1] for i in idx):
            out[c] = list(bootstrap_gap([ours[i] for i in idx], [ref[i] for i in idx]))
    return out


def test_categories(test_file: Path) -> list[str]:
    """Each test record's category, in file order (the order of heldout_loss's per-record sums)."""
    from fedit.data.records import load_records

    return [r.category for r in load_records(test_file).records]


def traffic(clients: list[dict], rounds: int) -> dict:
    """Bytes a run moved (per round, per client by LoRA rank) and its clients' training time."""
    from fedit import server

    return {"bytes_per_client_by_rank": {str(r): t["bytes_down"] + t["bytes_up"]
                                         for r, t in server.traffic_by_rank(clients).items()},
            "bytes_per_round": sum((c.get("bytes_down") or 0) + (c.get("bytes_up") or 0) for c in clients
                                   if c.get("accepted")) / max(1, rounds),
            "train_seconds": round(sum(c.get("metrics", {}).get("seconds", 0.0) for c in clients), 1)}


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
        f"LoRA r={c['lora']['r']}; seed {c['federation']['seed']}; this invocation took "
        f"{res['seconds'] / 60:.1f} min (a rerun reuses the runs that finished).", "",
        "Held-out loss per response token after the last round (lower is better); the gaps are relative to "
        "Centralized and to FedAvg (negative: lower loss than it), each with a 95% paired bootstrap interval "
        "over the held-out records.", "",
        report.table(head, rows), "", *category_table(res), "Options and settings each run had:", "", *opts, "",
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
    ax.axhline(res["centralized"]["loss"], color="black", ls="--", lw=1.2,
               label=f"centralized ({central_label(res)})")
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
