"""`fedit eval`: evaluate an adapter (and optionally a baseline) on a test file, offline metrics
plus, when a judge is configured, the paper's pairwise LLM-judge protocol."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

from fedit import config as config_mod
from fedit.checkpoint import atomic_write, atomic_write_json
from fedit.config import DEFAULT_MODEL, Config
from fedit.errors import FeditError
from fedit.evaluation import report
from fedit.evaluation.evaluate import Settings, evaluate_active, load_model_set
from fedit.evaluation.questions import QuestionSet, load_questions

BASE = "base"


def run_dir_of(adapter_dir: Path) -> Path | None:
    """The fedit run directory an adapter directory belongs to (RUN/adapter or RUN/rounds/round_N)."""
    for d in (adapter_dir, adapter_dir.parent, adapter_dir.parent.parent):
        if (d / "config.toml").is_file():
            return d
    return None


def resolve(spec: str, flag: str) -> tuple[Path | None, Config | None]:
    """(adapter directory or None for the base model, the config of the run that made it or None)."""
    from fedit.inference import resolve_adapter

    if spec == BASE:
        return None, None
    p = Path(spec)
    if not p.exists():
        raise FeditError(f"{flag} {spec} does not exist; pass a run directory (the run.out of `fedit run`), "
                         f"its adapter/ directory, a PEFT adapter directory, or '{BASE}' for the untuned model")
    adapter_dir, _ = resolve_adapter(p)
    run = run_dir_of(adapter_dir)
    run_cfg = None
    if run is not None:
        try:
            run_cfg = config_mod.load(run / "config.toml")
        except FeditError as e:
            raise FeditError(f"{flag} {spec}: the run's config.toml is unreadable ({e})") from None
    return adapter_dir, run_cfg


def subset(qset: QuestionSet, limit: int, seed: int) -> QuestionSet:
    """A seeded random ``limit`` of the questions, in file order (0: all)."""
    if not limit or limit >= len(qset.questions):
        return qset
    keep = sorted(random.Random(seed).sample(range(len(qset.questions)), limit))
    return replace(qset, questions=[qset.questions[i] for i in keep])


def run_eval(adapter: str, data: str, cfg: Config, *, baseline: str | None = None, model: str | None = None,
             out: str | None = None, limit: int = 0, console=None) -> Path:
    """Evaluate ``adapter`` (and ``baseline``) on ``data``; write results.json and report.md; return the out dir."""
    say = console.print if console is not None else (lambda *a, **k: None)
    cand_dir, cand_cfg = resolve(adapter, "--adapter")
    if cfg.judge.url and baseline is None:
        baseline = BASE  # the judge compares a pair: by default the untuned base model
    base_dir, base_cfg = resolve(baseline, "--baseline") if baseline is not None else (None, None)
    run_models = {c.model.name for c in (cand_cfg, base_cfg) if c is not None}
    if model is None and len(run_models) > 1:
        raise FeditError(f"--adapter and --baseline were trained on different base models ({', '.join(sorted(run_models))}); "
                         f"compare adapters of the same base model, or pass --model to force one")
    model_name = model or (run_models.pop() if run_models else None) or cfg.model.name or DEFAULT_MODEL
    # Loss and prompts must match training: template, cutoff and masking come from the run.
    ref = cand_cfg or base_cfg or cfg
    settings = Settings.from_config(cfg.eval, ref.data.template, ref.train.cutoff_len, ref.train.train_on_inputs,
                                    cfg.federation.seed, cfg.train.micro_batch_tokens)
    qset = load_questions(data, limit=cfg.judge.questions, seed=cfg.judge.seed)
    qset = subset(qset, limit, cfg.federation.seed) if qset.has_references else qset
    if qset.skipped:
        say(f"{data}: {len(qset.skipped)} rows skipped (first: line {qset.skipped[0][0]}: {qset.skipped[0][1]})")
    labels = {_label(adapter, cand_dir): cand_dir}
    if baseline is not None:
        b_label = _label(baseline, base_dir)
        if b_label in labels:
            b_label = f"baseline: {b_label}"
        labels[b_label] = base_dir
    names = list(labels)

    if cfg.judge.url:  # fail on a bad judge setting before minutes of generation
        from fedit.evaluation.judge import JudgeClient

        judge_client = JudgeClient(cfg.judge)
    out_dir = Path(out) if out else _default_out(cand_dir, data)
    say(f"loading {model_name} with {', '.join(names)}")
    models = load_model_set(model_name, labels, cfg.model.dtype, cfg.model.device)
    results: dict[str, dict] = {}
    for name in names:
        with models.use(name) as loaded:
            say(f"{name}: {'loss, ' if qset.has_references else ''}{len(qset.questions)} answers ...")
            results[name] = evaluate_active(loaded, qset, settings, name)
            r = results[name]
            if "loss" in r:
                say(f"{name}: loss {r['loss']['loss']:.4f}, perplexity {r['loss']['perplexity']:.2f}, "
                    f"ROUGE-L {r['rouge_l']['mean']:.4f} ({r['seconds_generation']:.0f}s generating)")
    judgement = None
    if cfg.judge.url:
        from fedit.evaluation.judge import judge_pair

        say(f"judging {names[0]} vs {names[1]} with {cfg.judge.model}: {len(qset.questions)} questions x 2 orders x "
            f"{cfg.judge.samples} samples")
        judgement = judge_pair(judge_client, qset.questions, [a["answer"] for a in results[names[0]]["answers"]],
                               [a["answer"] for a in results[names[1]]["answers"]], samples=cfg.judge.samples,
                               names=(names[0], names[1]))
    meta = {"model": model_name, "adapter": str(cand_dir) if cand_dir else BASE,
            "baseline": (str(base_dir) if base_dir else BASE) if baseline is not None else None,
            "data": str(data), "questions": len(qset.questions), "settings": settings.to_dict()}
    md = report.eval_markdown(list(results.values()), title=f"fedit eval: {names[0]}")
    if len(names) > 1 and qset.has_references:
        md += "\n## Comparison\n\n" + report.comparison_tables(results, names[0], names[1:])
    if judgement is not None:
        md += "\n## LLM judge\n\n" + report.judge_tables({names[1]: judgement}, names[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "results.json", {**meta, "results": results, "judge": judgement})
    atomic_write(out_dir / "report.md", md + "\n")
    say(md)
    say(f"wrote {out_dir / 'results.json'} and {out_dir / 'report.md'}")
    return out_dir


def _label(spec: str, adapter_dir: Path | None) -> str:
    if adapter_dir is None:
        return "base model"
    run = run_dir_of(adapter_dir)
    return (run or adapter_dir).name if run is None or adapter_dir.name == "adapter" else f"{run.name}/{adapter_dir.name}"


def _default_out(cand_dir: Path | None, data: str) -> Path:
    stem = Path(data).stem
    run = run_dir_of(cand_dir) if cand_dir is not None else None
    return (run / "eval" / stem) if run is not None else Path("eval") / stem


def load_results(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
