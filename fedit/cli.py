"""The `fedit` command line: partition, run, eval, reproduce, generate, chat, export, bench, flower."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from fedit import use_cli
from fedit.config import DataConfig
from fedit.errors import FeditError
from fedit.evaluation import cli as eval_cli
from fedit.runtime import deploy, flower_cli


def _partition(args: argparse.Namespace, console) -> None:
    from fedit.data import partition

    m, loaded = partition.make(args.data, args.out, clients=args.clients, scheme=args.scheme, alpha=args.alpha,
                               min_size=args.min_size, test_per_category=args.test_per_category, seed=args.seed,
                               fields=args.fields, split_name=args.split, by=args.by, label=args.label,
                               validation=_amount("--validation", args.validation))
    for line in partition.describe(m, loaded):
        console.print(line)
    console.print(f"wrote {args.out}/ (client_*.jsonl, test.jsonl, manifest.json, heterogeneity.png)")


def _amount(flag: str, text: str):
    """A fraction or count given on the command line, checked as data.client_validation is."""
    import dataclasses
    import tomllib

    from fedit.fields import check_value

    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    fld = next(f for f in dataclasses.fields(DataConfig) if f.name == "client_validation")
    value, problem = check_value(flag, fld, value)
    if problem:
        raise FeditError(problem)
    return value


def _run(args: argparse.Namespace, console) -> None:
    from fedit import config, runner

    if args.help_config:
        print(config.describe())
        return
    if args.resume and (args.config or args.overrides):
        raise FeditError("--resume continues a run with the config saved in its directory; "
                         "leave out --config and key=value overrides")
    cfg = None if args.resume else config.load(args.config, args.overrides)
    run_dir = runner.run(cfg, resume=args.resume, console=console)
    console.print(runner.summary(run_dir))


def _bench(args: argparse.Namespace, console) -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "bench.py").is_file():
        raise FeditError("fedit bench runs from a source checkout (it needs the benchmarks/ directory); "
                         "clone the repository and `pip install -e .`")
    from fedit.config import FederationConfig

    paper_rounds = FederationConfig().rounds
    if args.protocol_rounds is not None and not 0 <= args.protocol_rounds <= paper_rounds:
        raise FeditError(f"--protocol-rounds {args.protocol_rounds}: the paper's protocol has {paper_rounds} rounds; "
                         f"pass 0 to {paper_rounds}")
    sys.path.insert(0, str(root))
    if args.device == "cuda":  # the GPU benchmark: naive vs fedit at 135M and 7B shapes (benchmarks/gpu.py)
        from benchmarks import gpu

        gpu.main(["--kit", args.kit, "--out", args.out, "--device", "cuda", "--time-budget", str(args.time_budget)])
        return
    from benchmarks import bench

    bench.run(Path(args.out), quick=args.quick, model=args.model, skip_naive=args.skip_naive,
              protocol_rounds=args.protocol_rounds, console=console)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedit", description="Federated instruction tuning (FedIT) of LLMs with LoRA.")
    sub = p.add_subparsers(dest="command", required=True)

    d = DataConfig()  # the defaults of `fedit run`'s data.* keys, which are the same options
    pp = sub.add_parser("partition", help="split instruction data or conversations into a test set and client files")
    pp.add_argument("--data", required=True, help="JSON/JSONL file or Hugging Face hub dataset id")
    pp.add_argument("--clients", type=int, default=d.clients, help=f"number of clients (default {d.clients})")
    pp.add_argument("--scheme", default=d.scheme, choices=("iid", "shards", "dirichlet", "quantity"))
    pp.add_argument("--alpha", type=float, default=d.alpha, help="Dirichlet concentration (dirichlet, quantity)")
    pp.add_argument("--by", default=d.by, metavar="FIELD",
                    help="natural clients: one per value of FIELD (e.g. user); --clients and --scheme are not used")
    pp.add_argument("--label", default=d.label, metavar="FIELD",
                    help="the field that is each record's category (default: category)")
    pp.add_argument("--min-size", type=int, default=d.min_size,
                    help="minimum records per client (dirichlet, quantity; default min(40, train/clients/2)); "
                         "with --by, smaller clients are left out (default 1)")
    pp.add_argument("--test-per-category", type=int, default=d.test_per_category,
                    help=f"held-out records per category for the server's test set (default {d.test_per_category}; 0: none)")
    pp.add_argument("--validation", default="0", metavar="FRACTION_OR_COUNT",
                    help="count each client's validation records as data.client_validation will hold them back "
                         "(e.g. 0.1 or 5; default 0: none)")
    pp.add_argument("--seed", type=int, default=d.seed)
    pp.add_argument("--fields", default=d.fields, help="field mapping, e.g. instruction=prompt,response=answer")
    pp.add_argument("--split", default=d.split, help=f"split of a hub dataset (default {d.split})")
    pp.add_argument("--out", required=True, help="output directory")

    pr = sub.add_parser("run", help="federated LoRA instruction tuning, in-process")
    pr.add_argument("--config", default=None, help="TOML config file")
    pr.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run")
    pr.add_argument("--help-config", action="store_true", help="list every config key with its default")
    pr.add_argument("overrides", nargs="*", metavar="section.key=value")

    pb = sub.add_parser("bench", help="measure training throughput, round overhead, memory, aggregation, bytes")
    pb.add_argument("--out", default="bench-results", help="directory for bench.json, bench.md and work files")
    pb.add_argument("--quick", action="store_true", help="fewer examples and 100 instead of 1,000 clients")
    pb.add_argument("--model", default=None, help="base model (default: the default model)")
    pb.add_argument("--skip-naive", action="store_true", help="leave out the slow naive-loop baseline")
    pb.add_argument("--protocol-rounds", type=int, default=None, metavar="N",
                    help="run the first N of the paper protocol's 20 rounds (default 1, 0 with --quick; 20: all)")
    pb.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: the GPU benchmark instead (benchmarks/gpu.py; 135M and 7B shapes, random weights), "
                         "reading --kit; docs/performance.md, 'GPU'")
    pb.add_argument("--kit", default="gpu-kit", help="--device cuda: folder from `python -m benchmarks.gpu_prepare`")
    pb.add_argument("--time-budget", type=float, default=420.0,
                    help="--device cuda: seconds after which no case starts and a running one stops (default 420)")

    eval_cli.add_parsers(sub)
    use_cli.add_parsers(sub)
    flower_cli.add_parser(sub)
    deploy.add_parsers(sub)
    return p


COMMANDS = {"partition": _partition, "run": _run, "bench": _bench, "flower": flower_cli.main,
            **eval_cli.COMMANDS, **use_cli.COMMANDS, **deploy.COMMANDS}


def quiet_libraries() -> None:
    """fedit prints its own progress; the libraries' load bars and deprecation notes are noise to a user."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from rich.console import Console

    console = Console(soft_wrap=True, markup=False, highlight=False)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    return guarded(lambda: COMMANDS[args.command](args, console), f"fedit {args.command}")


def guarded(run, name: str) -> int:
    """Run a command; fedit's errors (a missing file, a bad override, a run directory made with other settings)
    end in one line on stderr and exit status 2, an interrupt in one line and 130, never in a traceback."""
    try:
        run()
    except FeditError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
