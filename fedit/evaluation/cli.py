"""The `fedit eval`, `fedit reproduce` and `fedit compare` subcommands; fedit/cli.py adds them with add_parsers."""

from __future__ import annotations

import argparse


def add_parsers(sub) -> None:
    pe = sub.add_parser(
        "eval", help="held-out loss, perplexity and ROUGE-L per category (and LLM-judge scores) of an adapter",
        description="Evaluate an adapter on a test file: per-category held-out loss and perplexity of the reference "
                    "responses, generated answers with ROUGE-L against the references; with judge.url set, the "
                    "paper's pairwise LLM-judge scores against --baseline (default: the base model). "
                    "A Vicuna question file (question_id, turns) gets answers and judge scores only.")
    pe.add_argument("--adapter", required=True, metavar="RUN_DIR_OR_ADAPTER",
                    help="a run directory, its adapter/ (or rounds/round_N), a PEFT adapter directory, or 'base'")
    pe.add_argument("--data", required=True, metavar="TEST_FILE",
                    help="JSON/JSONL test records (e.g. the test.jsonl of `fedit partition`) or Vicuna questions")
    pe.add_argument("--baseline", default=None, metavar="RUN_DIR_OR_ADAPTER",
                    help="a second adapter (or 'base') evaluated alike and compared; the judge's baseline")
    pe.add_argument("--model", default=None, help="base model (default: the one the run used)")
    pe.add_argument("--out", default=None, help="output directory (default: RUN_DIR/eval/<test file name>)")
    pe.add_argument("--limit", type=int, default=0, help="evaluate a seeded random N of the test records (0: all)")
    pe.add_argument("--config", default=None, help="TOML file with [eval], [judge] (and [model]) keys")
    pe.add_argument("overrides", nargs="*", metavar="section.key=value",
                    help="e.g. eval.max_new_tokens=256 judge.url=http://127.0.0.1:8000/v1 judge.model=NAME")

    from fedit.reproduce import SCALES

    pr = sub.add_parser(
        "reproduce", help="train and evaluate the paper's baselines and FedIT; write Table 2/3-style reports",
        description="Trains the base model's baselines (Local-1: brainstorming, Local-2: closed QA, Local-3: "
                    "classification + brainstorming, Centralized) and FedIT on the same data and budget, evaluates "
                    "all on the same held-out test records, and writes report.md (Table 2), report.png and "
                    "table3.md (answers side by side). Scales: "
                    + "; ".join(f"{s.name}: {s.about}" for s in SCALES.values()))
    pr.add_argument("--scale", required=True, choices=tuple(SCALES))
    pr.add_argument("--data", default=None, help="Dolly-style records: a JSON/JSONL file or hub id "
                                                 "(default: databricks/databricks-dolly-15k)")
    pr.add_argument("--questions", default=None, metavar="FILE",
                    help="extra question set for the judge and Table 3, e.g. vicuna-80-questions.jsonl "
                         "(judge.questions of them, seeded; the paper: 20)")
    pr.add_argument("--out", default=None, help="output directory (default: runs/reproduce-SCALE)")
    pr.add_argument("--config", default=None, help="TOML file applied over the scale's settings")
    pr.add_argument("--show-settings", action="store_true", help="print the scale's exact settings and exit")
    pr.add_argument("overrides", nargs="*", metavar="section.key=value",
                    help="applied last, e.g. model.name=DIR judge.url=URL judge.model=NAME")

    from fedit.compare import SCALES as COMPARE_SCALES

    pc = sub.add_parser(
        "compare", help="train federated algorithms on the same split; held-out loss per round vs Centralized",
        description="Trains every listed strategy on the same Dirichlet split, from the same init, with the same "
                    "client selection and budget, and Centralized as the reference; writes compare.md (held-out "
                    "loss overall and per category, gap to Centralized with a 95%% bootstrap interval, bytes per "
                    "round, each strategy's options), compare.png (loss per round) and compare.json. Scales: "
                    + "; ".join(f"{s.name}: {s.about}" for s in COMPARE_SCALES.values()))
    pc.add_argument("--scale", required=True, choices=tuple(COMPARE_SCALES))
    pc.add_argument("--strategies", required=True,
                    help="comma-separated, e.g. fedavg,fedprox,fedavgm,fedadam,fedyogi,fedadagrad,scaffold; "
                         "LABEL=STRATEGY runs a strategy again under its own name, with its own --set overrides "
                         "(e.g. fedavg,mixed=fedavg --set 'mixed:lora.client_ranks=[2,4,8,16]')")
    pc.add_argument("--data", default=None, help="Dolly-style records: a JSON/JSONL file or hub id "
                                                 "(default: databricks/databricks-dolly-15k)")
    pc.add_argument("--set", action="append", default=[], metavar="STRATEGY:section.key=value", dest="sets",
                    help="an override for one strategy (or label) only, e.g. fedprox:strategy.proximal_mu=0.1 "
                         "(repeatable)")
    pc.add_argument("--select", action="store_true",
                    help="choose each strategy's options on the clients' federated validation loss "
                         "(data.client_validation, default 0.1 here), with no test data at the server; the test "
                         "split is read only after the choice is written (selection.json)")
    pc.add_argument("--grid", action="append", default=[], metavar="STRATEGY:section.key=v1,v2,...", dest="grids",
                    help="with --select: the values to choose among for one option of one strategy (or label), "
                         "e.g. fedprox:strategy.proximal_mu=0.001,0.01,0.1; several grids of one strategy multiply")
    pc.add_argument("--test-rounds", default="all", choices=("all", "last"),
                    help="with --select: score each chosen run on the test split after every round (all: the test "
                         "curve and its agreement with validation per round) or after its last round only (last: "
                         "one test pass per run instead of one per round)")
    pc.add_argument("--seeds", default="", metavar="S1,S2,...",
                    help="run the whole comparison once per seed (split, init, selection, order and validation "
                         "split all follow it) and report the mean and spread over seeds (compare-seeds.md)")
    pc.add_argument("--out", default=None, help="output directory (default: runs/compare-SCALE, or "
                                                "runs/compare-SCALE-select)")
    pc.add_argument("--config", default=None, help="TOML file applied over the scale's settings")
    pc.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to every strategy")
    add_personalize(sub)


def add_personalize(sub) -> None:
    pp = sub.add_parser(
        "personalize", help="per client: the global adapter vs the client's local-only model vs a few local steps "
                            "on top, on the client's own validation split",
        description="For each client of a finished run made with data.client_validation: the validation loss of the "
                    "final global adapter, of it fine-tuned for personalize.steps steps on the client's training "
                    "split (saved in RUN/personalized/client_N), and of an adapter trained on the client's data "
                    "alone from the base model (personalize.local_epochs); writes personalize.md, .png and .json.")
    pp.add_argument("--run", required=True, metavar="RUN_DIR", help="the run.out of a finished run")
    pp.add_argument("overrides", nargs="*", metavar="personalize.key=value",
                    help="e.g. personalize.steps=20 personalize.clients=10 (see fedit run --help-config)")


def personalize_command(args: argparse.Namespace, console) -> None:
    from fedit.personalize import personalize

    personalize(args.run, args.overrides, console=console)


def eval_command(args: argparse.Namespace, console) -> None:
    from fedit import config
    from fedit.evaluation.pipeline import run_eval

    if args.limit < 0:
        from fedit.errors import FeditError

        raise FeditError(f"--limit must be 0 (all) or a positive number, got {args.limit}")
    cfg = config.load(args.config, args.overrides)
    run_eval(args.adapter, args.data, cfg, baseline=args.baseline, model=args.model, out=args.out,
             limit=args.limit, console=console)


def reproduce_command(args: argparse.Namespace, console) -> None:
    from fedit import reproduce

    if args.show_settings:
        scale = reproduce.SCALES[args.scale]
        console.print(reproduce.describe(scale, reproduce.resolve_config(scale, args.config, args.overrides)))
        return
    reproduce.reproduce(args.scale, data=args.data or reproduce.DEFAULT_DATA, out=args.out, config_file=args.config,
                        overrides=args.overrides, questions=args.questions, console=console)


def compare_command(args: argparse.Namespace, console) -> None:
    from fedit import compare
    from fedit.reproduce import DEFAULT_DATA

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    compare.compare(args.scale, strategies, data=args.data or DEFAULT_DATA, out=args.out, config_file=args.config,
                    overrides=args.overrides, sets=args.sets, console=console, grids=args.grids, select=args.select,
                    seeds=_seeds(args.seeds), test_rounds=args.test_rounds)


def _seeds(text: str) -> list[int]:
    from fedit.errors import FeditError

    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise FeditError(f"--seeds {text!r}: give whole numbers separated by commas, e.g. 42,43,44") from None


COMMANDS = {"eval": eval_command, "reproduce": reproduce_command, "compare": compare_command,
            "personalize": personalize_command}
