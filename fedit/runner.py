"""`fedit run`: put the pieces together for an in-process run and show its progress.

Loads the base model once, attaches the LoRA adapter, reads the partition,
and hands the round loop (server.run) an in-process Simulation. The Flower
server side (runtime/flower.py) shares ``resolve_run`` and ``run_metadata`` but
prepares without client files: they live on the client machines.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from fedit import __version__, attacks, canaries, server
from fedit import config as config_mod
from fedit.config import Config
from fedit.data import partition
from fedit.data.clients import ClientFiles
from fedit.data.batches import Example, shortening, tokenize
from fedit.data.records import load_records
from fedit.checkpoint import atomic_write_json
from fedit.errors import FeditError
from fedit.evaluation.heldout import heldout_loss
from fedit.adapter import Adapter, save_adapter
from fedit.model import Loaded, attach_lora, load_base
from fedit.runtime.simulation import Simulation

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    loaded: Loaded
    clients: ClientFiles
    test: list[Example] | None  # None: the server holds no test set
    data_sha256: str
    test_file: Path | None

    def evaluate(self, adapter: Adapter, cfg: Config) -> dict:
        return heldout_loss(self.loaded, self.test, adapter, cfg.eval.batch_size, cfg.train.micro_batch_tokens)

    def save(self, adapter: Adapter, path: Path) -> None:
        save_adapter(self.loaded.model, adapter, path)


def partition_dir(cfg: Config, run_dir: Path, say: Callable[[str], None] = lambda line: None) -> Path:
    """The run's partition: data.clients_dir, or data.source partitioned into <run>/data the
    first time (a resumed or restarted run finds it there)."""
    if cfg.data.clients_dir:
        return Path(cfg.data.clients_dir)
    out = run_dir / "data"
    if not (out / "manifest.json").is_file():
        d = cfg.data
        how = f"a client per {d.by!r}" if d.by else f"{d.scheme}, {d.clients} clients"
        say(f"partitioning {d.source} into {out} ({how}) ...")
        m, loaded = partition.make(d.source, out, clients=d.clients, scheme=d.scheme, alpha=d.alpha,
                                   min_size=d.min_size, test_per_category=d.test_per_category, seed=d.seed,
                                   fields=d.fields, split_name=d.split, by=d.by, label=d.label,
                                   validation=d.client_validation)
        for line in partition.describe(m, loaded):
            say(line)
    return out


def server_test_file(cfg: Config, clients_dir: Path | None) -> Path | None:
    """The test file the server scores, or None where it holds none: eval.test off, or no data.test_file and
    no records in the partition's test.jsonl. What it cannot do without one is said once, here."""
    if not cfg.eval.every:
        return None
    if not cfg.eval.test:
        path = None
    elif cfg.data.test_file:
        path = Path(cfg.data.test_file)
        if not path.is_file():
            raise FeditError(f"data.test_file {path} does not exist; point it at a held-out file, or leave it unset "
                             f"(the run then measures itself on data.client_validation)")
        return path
    else:
        path = clients_dir / "test.jsonl" if clients_dir else None
        if path and path.is_file() and path.stat().st_size:
            return path
    if not cfg.data.client_validation:
        why = "eval.test = false" if not cfg.eval.test else f"{path or 'no data.test_file'} has no records"
        raise FeditError(f"the server holds no test set ({why}) and the "
                         f"clients hold back no validation split: nothing would measure the run. Set "
                         f"data.client_validation (e.g. 0.1: federated evaluation on the clients' own data), or "
                         f"data.test_file, or eval.every = 0")
    return None


def prepare(cfg: Config, loaded: Loaded | None = None, run_dir: Path | None = None,
            say: Callable[[str], None] = lambda line: None) -> Prepared:
    clients_dir = partition_dir(cfg, Path(run_dir or cfg.run.out), say)
    test_file = server_test_file(cfg, clients_dir)
    if loaded is None:
        loaded = load_base(cfg.model)
        attach_lora(loaded, cfg.lora, cfg.federation.seed)
    t, d = cfg.train, cfg.data
    clients = ClientFiles(clients_dir, loaded.tokenizer, t.cutoff_len, t.train_on_inputs, d.template,
                          validation=d.client_validation, seed=d.seed, eval_cutoff_len=cfg.eval.cutoff_len)
    test = None
    if test_file is not None:
        test = tokenize(load_records(test_file).records, loaded.tokenizer, cfg.eval.cutoff_len or t.cutoff_len,
                        t.train_on_inputs, d.template)
        if note := shortening(test):
            say(f"held-out set: {note}")
    if d.client_validation and not clients.manifest.get("client_validation"):  # the manifest did not count them
        say(partition.validation_line(d.client_validation, [c["examples"] for c in clients.manifest["clients"]]))
    if test is None:
        say("the server holds no test set: every figure is the clients' federated validation loss")
    return Prepared(loaded, clients, test, data_fingerprint(clients_dir, test_file), test_file)


def data_fingerprint(clients_dir: Path, test_file: Path | None) -> str:
    """sha256 of the files a run reads: its clients' and, where the server holds one, its test file."""
    return partition.partition_sha256(clients_dir, test_file, test=test_file is not None)


def run_metadata(cfg: Config, loaded: Loaded) -> dict:
    import torch
    import transformers
    import peft

    return {"fedit": __version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model_source": loaded.source,
            "device": str(loaded.device), "compute_dtype": str(loaded.dtype).replace("torch.", ""),
            "dtype_setting": cfg.model.dtype, "attention": loaded.model.config._attn_implementation,
            "packed_batches": loaded.packed, "loss_from_full_forward": loaded.own_logits, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "machine": f"{platform.machine()} {platform.processor()} {torch.get_num_threads()} threads"}


def resolve_run(cfg: Config | None, resume: str | None) -> tuple[Config, Path]:
    """(config, run directory): a resumed run brings its own saved config."""
    if not resume:
        return cfg, Path(cfg.run.out)
    run_dir = Path(resume)
    if not (run_dir / "config.toml").is_file():
        raise FeditError(f"{run_dir} is not a fedit run directory (no config.toml); pass the run.out of a run")
    return config_mod.load(run_dir / "config.toml"), run_dir


def run(cfg: Config | None, resume: str | None = None, console=None, loaded: Loaded | None = None) -> Path:
    """Run or resume the federated training in-process; return the run directory."""
    cfg, run_dir = resolve_run(cfg, resume)
    if cfg.secagg.enabled:  # in one process there is no server to hide single changes from
        raise FeditError("secagg.enabled: secure aggregation runs between real clients on Flower; launch with "
                         "`fedit flower run --secure-aggregation` (docs/flower.md), or set secagg.enabled = false")
    prep = prepare(cfg, loaded, run_dir, console.print if console is not None else lambda line: None)
    progress = _Progress(cfg, console) if console is not None and cfg.run.progress else None
    sim = Simulation(prep.loaded, prep.clients, cfg, state_dir=run_dir / "client_state",
                     on_client=progress.client if progress else None)
    meta = run_metadata(cfg, prep.loaded)
    if sim.attackers:  # an experiment with simulated malicious clients says so in run.json
        a = cfg.attack
        meta["attack"] = {"kind": a.kind, "clients": sorted(sim.attackers),
                          "boost" if a.kind == "backdoor" else "factor": a.strength}
    if console is not None and "tensorboard" in cfg.run.report_to:
        console.print(f"watch it: tensorboard --logdir {run_dir / 'tensorboard'}")
    from fedit.aggregators import round_size, tolerance  # raises where a robust aggregator would tolerate no one
    defence = tolerance(cfg, round_size(cfg.federation, len(prep.clients.ids)))
    if console is not None:
        console.print(defence)
    splits = prep.clients.sizes()
    sizes = {c: train for c, (train, _) in splits.items()}
    if cfg.data.client_validation:  # each client's training and validation records, as this run holds them back
        meta["client_splits"] = {str(c): {"train": train, "validation": val} for c, (train, val) in splits.items()}
    canary = cfg.canary
    if canary.client >= 0:  # an experiment with inserted secrets: that client holds more records
        sizes[canary.client] = sizes.get(canary.client, 0) + canary.count * canary.repeats
    with progress.live() if progress else _nothing():
        final = server.run(cfg, sim, run_dir, client_ids=prep.clients.ids, initial_adapter=prep.loaded.initial_adapter,
                           save_adapter=prep.save, evaluate=(lambda a: prep.evaluate(a, cfg)) if prep.test else None,
                           resume=bool(resume), hooks=progress.hooks() if progress else None, meta=meta,
                           client_sizes=sizes, data_sha256=prep.data_sha256,
                           validation_sizes={c: val for c, (_, val) in splits.items()})
    server.plot_run(server.RunDir(run_dir))
    if cfg.attack.kind == "backdoor":  # how often the final model answers the trigger with the target
        test = load_records(prep.test_file).records
        a, template = cfg.attack, cfg.data.template
        atomic_write_json(run_dir / "backdoor.json", {
            **attacks.backdoor_success(prep.loaded, final, test, a.trigger, a.target, template),
            "target_loss": attacks.target_loss(prep.loaded, final, test, a.trigger, a.target, template,
                                               cfg.eval.cutoff_len or cfg.train.cutoff_len, cfg.eval.batch_size)})
    if canary.client >= 0:
        inserted, references = canaries.secrets_of(canary.seed, canary.count, canary.references)
        atomic_write_json(run_dir / "canary.json", canaries.exposure(
            prep.loaded, final, inserted, references, cfg.data.template, cfg.train.cutoff_len, cfg.eval.batch_size))
    return run_dir


@contextmanager
def _nothing() -> Iterator[None]:
    yield


class _Progress:
    """Rounds, clients and steps with ETA (rich), and one printed line per finished round."""

    def __init__(self, cfg: Config, console):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.cfg, self.console = cfg, console
        self.bar = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)
        self.rounds = self.bar.add_task("rounds", total=cfg.federation.rounds)
        self.steps = self.bar.add_task("client", total=1, visible=False)
        self.selected: list[int] = []

    def live(self):
        return self.bar

    def hooks(self) -> server.Hooks:
        return server.Hooks(round_start=self._round_start, round_end=self._round_end)

    def _round_start(self, r: int, selected: list[int]) -> None:
        self.selected = selected
        self.bar.update(self.rounds, completed=r - 1, description=f"round {r}/{self.cfg.federation.rounds}")

    def client(self, r: int, cid: int) -> Callable[[int, int], None]:
        pos = self.selected.index(cid) + 1 if cid in self.selected else 0
        self.bar.reset(self.steps, total=None, visible=True,
                       description=f"  client {cid} ({pos}/{len(self.selected)}) steps")

        def on_step(step: int, total: int) -> None:
            self.bar.update(self.steps, completed=step, total=total)
        return on_step

    def _round_end(self, row: dict) -> None:
        self.bar.update(self.rounds, completed=row["round"])
        self.bar.update(self.steps, visible=False)
        loss = figures_line(row)
        what = "base model" if row["round"] == 0 else f"{row['accepted']} clients {row['clients']}"
        extra = f", {len(row['rejected'])} rejected" if row.get("rejected") else ""
        secs = f" in {row['seconds']:.1f}s" if "seconds" in row else ""
        dp = f", ε = {row['privacy']['epsilon']:.3f}" if "privacy" in row else ""
        self.console.print(f"round {row['round']:>3}: {loss}{dp} ({what}{extra}){secs}")


def figures_line(row: dict) -> str:
    """A round's figures, each named by where it came from: the server's test set, the clients' validation."""
    parts = []
    if row.get("eval"):
        parts.append(f"test loss {row['eval']['loss']:.4f}")
    val = row.get("validation")
    if val and "loss" in val:
        parts.append(f"validation loss {val['loss']:.4f} (federated, {val['clients']} clients; worst tenth "
                     f"{val['spread']['worst_tenth']:.4f})")
    elif val:
        parts.append(f"validation: no client scored ({len(val.get('left_out', []))} left out)")
    return ", ".join(parts) or "not evaluated"


def summary(run_dir: Path) -> str:
    """A few lines on the finished run: loss before, after, best, and where the files are."""
    rd = server.RunDir(run_dir)
    lines = [f"run directory: {run_dir}"]
    for key in ("eval", "validation"):
        curve = server.loss_curve(rd, key)
        if not curve:
            continue
        (r0, e0), (rn, en) = curve[0], curve[-1]
        name = "test loss (server's held-out set)" if key == "eval" else \
            f"validation loss (federated, {en['clients']} clients)"
        lines.append(f"{name}: {e0['loss']:.4f} (round {r0}) -> {en['loss']:.4f} (round {rn})")
        for cat in sorted(en["by_category"]):
            before = e0["by_category"].get(cat, float("nan"))
            lines.append(f"  {cat:<24} {before:.4f} -> {en['by_category'][cat]:.4f}")
        if key == "validation":
            s0, sn = e0["spread"], en["spread"]
            lines.append(f"  clients: median {s0['median']:.4f} -> {sn['median']:.4f}, worst tenth "
                         f"{s0['worst_tenth']:.4f} -> {sn['worst_tenth']:.4f}, max {s0['max']:.4f} -> {sn['max']:.4f}")
    best = (rd.read_state() or {}).get("best")
    if best:
        kept = f"; kept in {run_dir / 'best'}" if (run_dir / "best").is_dir() else ""
        lines.append(f"best round by validation loss: {best['round']} ({best['loss']:.4f}){kept}")
    tiers = server.traffic_by_rank(rd.events("client"))
    if tiers:
        lines.append("traffic per client and round: " + "; ".join(
            f"rank {r}: {t['bytes_down'] / 2**20:.2f} MB down, {t['bytes_up'] / 2**20:.2f} MB up ({t['updates']} updates)"
            for r, t in tiers.items()))
    dp = [row for row in rd.events("round") if "privacy" in row]
    if dp:
        p = dp[-1]["privacy"]
        lines.append(f"privacy: ε = {p['epsilon']:.3f} at δ = {p['delta']:g} after {len(dp)} rounds "
                     f"(client-level, noise multiplier {p['noise_multiplier']:.3f})")
    for stop in rd.events("stop"):
        lines.append(stop["reason"])
    if (run_dir / "backdoor.json").is_file():
        b = json.loads((run_dir / "backdoor.json").read_text())
        lines.append(f"backdoor: {b['with_trigger']:.0%} of {b['prompts']} held-out prompts with the trigger answered "
                     f"with the target ({b['without']:.0%} without the trigger)"
                     + (f"; the target's loss per token {b['target_loss']['with_trigger']:.3f} with the trigger, "
                        f"{b['target_loss']['without']:.3f} without" if "target_loss" in b else ""))
    if (run_dir / "canary.json").is_file():
        c = json.loads((run_dir / "canary.json").read_text())
        lines.append(f"canaries: mean exposure {c['mean_exposure']:.2f} of at most {c['max_exposure']:.2f} bits "
                     f"(ranks {[r['rank'] for r in c['canaries']]} among {c['references']} references)")
    lines.append(f"final adapter: {run_dir / 'adapter'} (PeftModel.from_pretrained(base, dir))")
    lines.append(f"plot: {run_dir / 'loss.png'}   metrics: {rd.metrics}")
    return "\n".join(lines)
