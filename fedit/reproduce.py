"""`fedit reproduce`: the paper's Table 2 and Table 3 in one command.

Trains the paper's baselines and FedIT on the same data under the same budget
rule (one local epoch over one's own data, same optimiser settings), evaluates
all of them on the same held-out test records, and writes a report.

Methods (Section 3.1 and Table 2 of the paper):
- base: the untuned model (the runs' shared, seeded LoRA init has B = 0, so it is exactly the base model).
- local-1: one client holding brainstorming only; local-2: closed QA only; local-3: classification and
  brainstorming (half each). The paper's local clients are clients of its non-IID split; here they are drawn
  from the federated training pool by category, each the size of a typical federated client
  (training records / clients, capped by what the category has) and disjoint from one another while a
  category has records enough (on tiny data local-3's brainstorming half may repeat local-1's records). A typical
  client's size, not all of a category: the paper's point is what one client can learn from its own small
  data, and a local model trained on all ~1,700 brainstorming records would be a per-category centralised
  model instead.
- centralized: one epoch on all the training records.
- fedit: the federated run on the dirichlet split of the same training records.

Every training is ``runner.run``: the baselines are one-client partitions run for one round with one
client and one local epoch, so the same loop, budget rules and run-directory artifacts apply. A
re-run with the same --out reuses finished runs, resumes unfinished ones and reuses evaluations whose
inputs did not change; a run directory made with other settings is an error, not silently reused.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedit import config as config_mod
from fedit.checkpoint import atomic_write, atomic_write_json
from fedit.config import Config
from fedit.data import partition
from fedit.data.records import LoadResult, Record, load_records
from fedit.errors import FeditError
from fedit.evaluation import report
from fedit.evaluation.evaluate import Settings, evaluate_active
from fedit.evaluation.questions import Question, QuestionSet, load_questions

DEFAULT_DATA = config_mod.DOLLY
LOCALS = {  # name -> categories it holds (the paper's Local-1, -2, -3)
    "local-1": ("brainstorming",),
    "local-2": ("closed_qa",),
    "local-3": ("classification", "brainstorming"),
}
METHODS = ("base", *LOCALS, "centralized", "fedit")
CANDIDATE = "fedit"


@dataclass(frozen=True)
class Scale:
    name: str
    about: str
    records: int  # records drawn (seeded) from the data before the split; 0 = all
    test_per_category: int
    clients: int
    min_client_size: int | None  # dirichlet minimum per client; None = partition's default
    config: dict[str, dict[str, Any]] = field(default_factory=dict)  # config overrides on the defaults
    table3_questions: int = 3


# The federated budget matches the centralised one in expectation: rounds x clients_per_round x a
# typical client's size = the training records (the paper: 20 x 5 x ~146 = ~14.6k, one pass).
SCALES = {
    "smoke": Scale(
        "smoke", "CI check: every step of the pipeline on a few records (minutes on 2 CPU cores)",
        records=160, test_per_category=2, clients=4, min_client_size=5,
        config={"federation": {"rounds": 2, "clients_per_round": 2},
                "train": {"batch_size": 8, "micro_batch_size": 4, "lr": 1e-3, "cutoff_len": 128},
                "eval": {"max_new_tokens": 32, "batch_size": 8}},
        table3_questions=2),
    "small": Scale(
        "small", "a scaled-down Table 2, about 75 minutes on 2 CPU cores (SmolLM2-135M)",
        records=2040, test_per_category=5, clients=20, min_client_size=20,
        config={"federation": {"rounds": 5, "clients_per_round": 4},
                "train": {"batch_size": 16, "micro_batch_size": 8, "lr": 5e-4, "cutoff_len": 256},
                "eval": {"max_new_tokens": 96, "batch_size": 8}}),
    "paper": Scale(
        "paper", "the paper's Section 3.1: all of Dolly, 10 test records per category, 100 clients "
                 "(dirichlet, alpha 0.5), 20 rounds x 5 clients, 1 local epoch, batch 32, lr 1.5e-4, cutoff 512",
        records=0, test_per_category=10, clients=100, min_client_size=None,
        config={"eval": {"max_new_tokens": 512}}),
}
ALPHA = 0.5  # dirichlet concentration of the federated split (the paper's Figure 2)


def resolve_config(scale: Scale, config_file: str | None, overrides: list[str] | tuple[str, ...]) -> Config:
    """The scale's settings, then the user's file, then the user's key=value overrides."""
    return config_mod.load(config_file, overrides, base=scale.config, base_name=f"the {scale.name} scale")


def describe(scale: Scale, cfg: Config) -> str:
    """The exact settings of a scale, as `fedit reproduce --show-settings` prints them."""
    t, f, e = cfg.train, cfg.federation, cfg.eval
    typical = "(records - test) / clients"
    lines = [f"scale {scale.name}: {scale.about}",
             f"  data: {'all records' if not scale.records else f'{scale.records} records (seeded sample)'}, "
             f"{scale.test_per_category} test records per category, {scale.clients} clients "
             f"(dirichlet alpha {ALPHA}, min {scale.min_client_size or 'default'} per client)",
             f"  fedit: {f.rounds} rounds x {f.clients_per_round} clients x {t.local_epochs:g} local epoch",
             f"  local-1/2/3: one client of {typical} records, {t.local_epochs:g} epoch; centralized: 1 epoch on "
             f"all training records",
             f"  training: batch {t.batch_size} (micro {t.micro_batch_size}), lr {t.lr:g}, cutoff {t.cutoff_len}, "
             f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} on {','.join(cfg.lora.target_modules)}, "
             f"max_steps {t.max_steps or 'none'}, seed {f.seed}, model {cfg.model.name} ({cfg.model.dtype})",
             f"  answers: {'sampled' if e.do_sample else 'greedy'}, at most {e.max_new_tokens} new tokens, "
             f"template {cfg.data.template}",
             "  judge: " + (f"{cfg.judge.model} at {cfg.judge.url}, {cfg.judge.samples} samples x 2 orders, "
                             f"{cfg.judge.questions or 'all'} Vicuna questions (seed {cfg.judge.seed})"
                             if cfg.judge.url else "none (set judge.url and judge.model)")]
    return "\n".join(lines)


# ---------------------------------------------------------------- data for every method

@dataclass
class Datasets:
    fedit: Path
    single: dict[str, Path]  # local-1/2/3 and centralized: one-client partition directories
    sizes: dict[str, dict]  # method -> {"examples": n, "categories": {...}}
    test_file: Path


def build_data(records: LoadResult, scale: Scale, seed: int, out: Path, scheme: str = "dirichlet",
               alpha: float = ALPHA) -> Datasets:
    """The federated split (``scheme``: `fedit compare` passes data.scheme, so an IID split is one override
    away; the held-out test records are drawn first and are the same for every scheme), the paper's local
    baselines and Centralized's union."""
    recs = records.records
    if scale.records and len(recs) > scale.records:
        keep = sorted(random.Random(seed).sample(range(len(recs)), scale.records))
        recs = [recs[i] for i in keep]
    loaded = LoadResult(records=recs, skipped=records.skipped, source=records.source)
    sp = partition.split(recs, scale.clients, scheme, alpha=alpha, seed=seed,
                         test_per_category=scale.test_per_category, min_size=scale.min_client_size)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    partition.write(data / "fedit", loaded, sp, scheme=scheme, seed=seed, alpha=alpha,
                    test_per_category=scale.test_per_category)
    train = sorted(i for c in sp.clients for i in c)
    typical = max(1, round(len(train) / scale.clients))
    rng = random.Random(seed)
    pools: dict[str, list[int]] = {}
    for i in train:
        pools.setdefault(recs[i].category, []).append(i)
    for pool in pools.values():
        rng.shuffle(pool)
    taken: dict[str, int] = {}  # how much of each category's shuffled pool earlier locals used: locals are disjoint
    chosen: dict[str, list[int]] = {}
    for name, cats in LOCALS.items():
        missing = [c for c in cats if not pools.get(c)]
        if missing:
            raise FeditError(f"{records.source} has no training records of category {', '.join(missing)} for "
                             f"{name}; the paper's baselines need Dolly's categories (brainstorming, closed_qa, "
                             f"classification)")
        idx: list[int] = []
        for k, c in enumerate(cats):
            want = typical // len(cats) + (1 if k < typical % len(cats) else 0)
            # Disjoint from earlier locals while the category lasts, then from its start again.
            pool, start = pools[c], taken.get(c, 0)
            got = [pool[(start + j) % len(pool)] for j in range(min(want, len(pool)))]
            taken[c] = start + len(got)
            idx += got
        if not idx:
            raise FeditError(f"no training records left for {name} (categories {', '.join(cats)}); use more data")
        chosen[name] = sorted(idx)
    chosen["centralized"] = train
    single = {}
    for name, idx in chosen.items():
        partition.write(data / name, loaded, partition.Split(test=sp.test, clients=[idx]), scheme=f"single ({name})",
                        seed=seed, alpha=ALPHA, test_per_category=scale.test_per_category)
        single[name] = data / name
    sizes = {name: _describe_records([recs[i] for i in idx]) for name, idx in chosen.items()}
    sizes["fedit"] = {**_describe_records([recs[i] for i in train]),
                      "clients": len(sp.clients), "typical_client": typical,
                      "client_sizes": [len(c) for c in sp.clients]}
    return Datasets(fedit=data / "fedit", single=single, sizes=sizes, test_file=data / "fedit" / "test.jsonl")


def _describe_records(rs: list[Record]) -> dict:
    cats: dict[str, int] = {}
    for r in rs:
        cats[r.category] = cats.get(r.category, 0) + 1
    return {"examples": len(rs), "categories": dict(sorted(cats.items()))}


def method_config(cfg: Config, name: str, data: Datasets, runs: Path) -> Config:
    if name == "fedit":
        return cfg.replace(data={"clients_dir": str(data.fedit), "test_file": ""}, run={"out": str(runs / name)})
    # One client, one round, one local epoch: the paper's local and centralised trainings.
    return cfg.replace(data={"clients_dir": str(data.single[name]), "test_file": ""}, run={"out": str(runs / name)},
                       federation={"rounds": 1, "clients_per_round": 1, "fraction": 0.0},
                       train={"local_epochs": 1.0})


# ---------------------------------------------------------------- the whole thing

def reproduce(scale_name: str, data: str = DEFAULT_DATA, out: str | None = None, config_file: str | None = None,
              overrides: list[str] | tuple[str, ...] = (), questions: str | None = None, console=None) -> Path:
    from fedit import server
    from fedit.adapter import load_adapter_file, set_adapter
    from fedit.model import attach_lora, load_base

    if scale_name not in SCALES:
        raise FeditError(f"--scale {scale_name!r}: choose one of {', '.join(SCALES)}")
    scale = SCALES[scale_name]
    cfg = resolve_config(scale, config_file, overrides)
    say = console.print if console is not None else (lambda *a, **k: None)
    out_dir = Path(out or f"runs/reproduce-{scale_name}")
    qfile = None
    if questions:
        qfile = load_questions(questions, limit=cfg.judge.questions, seed=cfg.judge.seed)
    judge_client = None
    if cfg.judge.url:
        from fedit.evaluation.judge import JudgeClient

        judge_client = JudgeClient(cfg.judge)  # bad judge settings fail now, not after the training
    say(describe(scale, cfg))
    started = time.perf_counter()
    records = load_records(data)
    ds = build_data(records, scale, cfg.federation.seed, out_dir)
    say(f"data: {ds.sizes['fedit']['examples']} training records over {ds.sizes['fedit']['clients']} clients, "
        f"test {ds.test_file}; " + ", ".join(f"{n} {s['examples']}" for n, s in ds.sizes.items() if n != "fedit"))

    loaded = load_base(cfg.model)
    attach_lora(loaded, cfg.lora, cfg.federation.seed)
    runs = out_dir / "runs"
    train_seconds: dict[str, float] = {}
    for name in METHODS[1:]:
        mcfg = method_config(cfg, name, ds, runs)
        t0 = time.perf_counter()
        train_or_reuse(name, mcfg, runs / name, out_dir, loaded, console,
                       f"{ds.sizes[name]['examples']} records"
                       + (f" over {mcfg.federation.rounds} rounds" if name == "fedit" else ", 1 epoch"))
        train_seconds[name] = round(time.perf_counter() - t0, 1)

    settings = Settings.from_config(cfg.eval, cfg.data.template, cfg.train.cutoff_len, cfg.train.train_on_inputs,
                                    cfg.federation.seed, cfg.train.micro_batch_tokens)
    test = load_questions(ds.test_file)
    sets = {"test": test} | ({"questions": qfile} if qfile else {})
    results: dict[str, dict[str, dict]] = {k: {} for k in sets}
    eval_dir = out_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    for name in METHODS:
        adapter = loaded.initial_adapter if name == "base" else load_adapter_file(runs / name / "adapter")
        set_adapter(loaded.model, adapter)
        fingerprint = _fingerprint(adapter, settings)
        for key, qset in sets.items():
            path = eval_dir / f"{name}.{key}.json"
            cached = json.loads(path.read_text()) if path.is_file() else None
            if cached and cached.get("fingerprint") == fingerprint and cached.get("question_ids") == [q.id for q in qset.questions] \
                    and cached.get("source") == qset.source:
                results[key][name] = cached
                continue
            say(f"evaluating {name} on {len(qset.questions)} {'test records' if key == 'test' else 'questions'}")
            r = evaluate_active(loaded, qset, settings, name)
            r.update(fingerprint=fingerprint, question_ids=[q.id for q in qset.questions])
            atomic_write_json(path, r)
            results[key][name] = r

    judgements: dict[str, dict] = {}
    if judge_client is not None:
        from fedit.evaluation.judge import judge_pair

        jkey = "questions" if qfile else "test"
        jset = sets[jkey]
        (out_dir / "judge").mkdir(exist_ok=True)
        for name in METHODS[:-1]:
            say(f"judging fedit vs {name}: {len(jset.questions)} questions x 2 orders x {cfg.judge.samples} samples")
            j = judge_pair(judge_client, jset.questions, [a["answer"] for a in results[jkey][CANDIDATE]["answers"]],
                           [a["answer"] for a in results[jkey][name]["answers"]], samples=cfg.judge.samples,
                           names=(CANDIDATE, name))
            atomic_write_json(out_dir / "judge" / f"{name}.json", j)
            judgements[name] = j

    table3_set = "questions" if qfile else "test"
    shown = _table3_ids(sets[table3_set], scale.table3_questions, cfg.federation.seed)
    atomic_write(out_dir / "table3.md", report.answers_page(
        results[table3_set], shown, f"Answers side by side ({scale.name} scale; the paper's Table 3)") + "\n")
    report.bar_chart(results["test"], CANDIDATE, judgements, out_dir / "report.png",
                     title=f"fedit reproduce --scale {scale.name}: {len(test.questions)} held-out test records")
    runs_meta = {name: _run_summary(server.RunDir(runs / name)) for name in METHODS[1:]}
    md = _report_md(scale, cfg, ds, results["test"], judgements, runs_meta, train_seconds, data,
                    qfile, time.perf_counter() - started)
    atomic_write(out_dir / "report.md", md)
    atomic_write_json(out_dir / "results.json", {
        "scale": scale.name, "data": data, "config": cfg.to_dict(), "sizes": ds.sizes, "runs": runs_meta,
        "metrics": {name: {k: report.metric(r, k) for k in report.METRICS} for name, r in results["test"].items()},
        "judge": {n: {k: v for k, v in j.items() if k not in ("reviews", "per_question")} for n, j in judgements.items()},
    })
    say(f"wrote {out_dir / 'report.md'}, {out_dir / 'report.png'}, {out_dir / 'table3.md'}")
    return out_dir


def train_or_reuse(name: str, mcfg: Config, run_dir: Path, out_dir: Path, loaded, console, what: str) -> None:
    """Train a method's run, resume it if it was cut short, or reuse it if it finished; a run directory
    made with other training settings is an error, never silently reused."""
    from fedit import runner

    say = console.print if console is not None else (lambda *a, **k: None)
    if (run_dir / "config.toml").is_file() and _training_settings(config_mod.load(run_dir / "config.toml")) \
            != _training_settings(mcfg):
        raise FeditError(f"{run_dir} holds a {name} run made with other settings; choose another --out or "
                         f"delete {out_dir}")
    run_json = run_dir / "run.json"
    trained_on = json.loads(run_json.read_text()).get("data_sha256") if run_json.is_file() else None
    clients_dir = Path(mcfg.data.clients_dir)
    if trained_on and trained_on != runner.data_fingerprint(clients_dir, runner.server_test_file(mcfg, clients_dir)):
        raise FeditError(f"{run_dir} holds a {name} run trained on other data than --data gives now; choose "
                         f"another --out or delete {out_dir}")
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        say(f"{name}: reusing the finished run in {run_dir}")
    elif (run_dir / "state.json").is_file():
        say(f"{name}: resuming {run_dir}")
        runner.run(None, resume=str(run_dir), console=console, loaded=loaded)
    else:
        say(f"{name}: training ({what})")
        runner.run(mcfg, console=console, loaded=loaded)


def _training_settings(cfg: Config) -> dict:
    """What decides a run's adapters (not how answers are generated or judged, nor progress bars)."""
    d = cfg.to_dict()
    return {k: d[k] for k in ("data", "model", "lora", "train", "federation", "strategy")} | {
        "eval_every": cfg.eval.every, "eval_cutoff_len": cfg.eval.cutoff_len}


def _fingerprint(adapter: dict, settings: Settings) -> str:
    h = hashlib.sha256(json.dumps(settings.to_dict(), sort_keys=True).encode())
    for k in sorted(adapter):
        h.update(k.encode())
        h.update(adapter[k].float().numpy().tobytes())
    return h.hexdigest()[:16]


def _table3_ids(qset: QuestionSet, n: int, seed: int) -> list[str]:
    """``n`` questions chosen by seed, from as many different categories as there are."""
    by_cat: dict[str, list[Question]] = {}
    for q in qset.questions:
        by_cat.setdefault(q.category, []).append(q)
    rng = random.Random(seed)
    cats = sorted(by_cat)
    rng.shuffle(cats)
    for c in cats:
        rng.shuffle(by_cat[c])
    ids: list[str] = []
    for k in range(max(len(v) for v in by_cat.values())):  # one per category, then round again
        ids += [by_cat[c][k].id for c in cats if k < len(by_cat[c])]
    ids = set(ids[:n])
    return [q.id for q in qset.questions if q.id in ids]


def _run_summary(rd) -> dict:
    clients = rd.events("client")
    metrics = [c.get("metrics", {}) for c in clients]
    return {"steps": sum(m.get("steps", 0) for m in metrics),
            "trained_examples": sum(c.get("num_examples", 0) for c in clients),
            "trained_tokens": sum(m.get("trained_tokens", 0) for m in metrics),
            "train_seconds": round(sum(m.get("seconds", 0.0) for m in metrics), 1)}


def _report_md(scale: Scale, cfg: Config, ds: Datasets, results: dict[str, dict], judgements: dict[str, dict],
               runs_meta: dict, train_seconds: dict, data: str, qfile: QuestionSet | None, seconds: float) -> str:
    baselines = list(METHODS[:-1])
    test = results[CANDIDATE]
    out = [f"# FedIT vs. its baselines ({scale.name} scale; the paper's Table 2)", "",
           f"Model {cfg.model.name}; data `{data}`; {test['questions']} held-out test records "
           f"({scale.test_per_category} per category); total time {seconds / 60:.1f} min.", "",
           "## Setup", "", "```", describe(scale, cfg), "```", ""]
    rows = []
    for name in METHODS:
        size = ds.sizes.get(name)
        meta = runs_meta.get(name, {})
        cats = ", ".join(f"{c} {n}" for c, n in size["categories"].items()) if size else "–"
        rows.append([name, str(size["examples"]) if size else "0", cats, str(meta.get("trained_examples", 0)),
                     str(meta.get("steps", 0)), str(meta.get("trained_tokens", 0)), f"{meta.get('train_seconds', 0):.0f}"])
    out += [report.table(["method", "training records", "categories", "examples trained", "optimizer steps",
                          "trained tokens", "training s"], rows), ""]
    out += [f"FedIT's {ds.sizes['fedit']['clients']} clients hold {min(ds.sizes['fedit']['client_sizes'])}-"
            f"{max(ds.sizes['fedit']['client_sizes'])} records (typical {ds.sizes['fedit']['typical_client']}); "
            f"'examples trained' counts every client's epoch, so it differs from one pass by the sizes of the "
            f"clients the rounds happened to pick.", ""]
    out += ["Budget rule: every method trains one local epoch over its own records with the same optimiser "
            "settings; FedIT's rounds x clients per round x a typical client's records equal one pass over the "
            "training records, as Centralized's epoch. The local baselines hold a typical client's number of "
            "records of their categories, drawn from the training pool (disjoint from each other while a category "
            "has enough records).", ""]
    out += ["## Offline metrics (held-out test records)", "",
            "Loss and perplexity of the reference responses (training masking); ROUGE-L F of the "
            f"{'sampled' if cfg.eval.do_sample else 'greedy'} answers against the references.", ""]
    out += [report.comparison_tables(results, CANDIDATE, baselines)]
    if judgements:
        where = f"{len(qfile.questions)} of {qfile.total} questions of `{qfile.source}`" if qfile else "the test records"
        out += ["## LLM judge", "", f"Questions: {where}.", "", report.judge_tables(judgements, CANDIDATE)]
    else:
        out += ["## LLM judge", "", "Not run: set judge.url and judge.model (and the API key variable) to add the "
                "paper's GPT-4-style scores.", ""]
    out += ["Answers side by side: [table3.md](table3.md); chart: ![report](report.png)", ""]
    return "\n".join(out)
