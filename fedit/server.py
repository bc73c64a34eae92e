"""The round loop, written once: select -> train -> check -> aggregate -> evaluate -> checkpoint.

It knows nothing of how clients are reached: a runtime (in-process simulation,
Flower) turns (round, client ids, global adapter) into an iterator of Updates.
Each completed round leaves, in this order, the round's PEFT adapter, its
metrics lines and then ``state.json``; a run killed at any instant resumes from
the last round whose state.json was written, and ends bit-identical to a run
that was never interrupted, because every random choice is seeded by
(seed, round, client) and nothing else.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import torch

from fedit import config as config_mod
from fedit.checkpoint import atomic_write, atomic_write_json
from fedit.client import Failure, Update
from fedit.config import Config
from fedit.errors import FeditError
from fedit.model import Adapter, load_adapter_file
from fedit.strategies import get as get_strategy

log = logging.getLogger(__name__)


class Runtime(Protocol):
    """Trains the selected clients from the global adapter; yields an Update per reply, or a
    Failure for a client that did not reply (the loop logs it and goes on without it)."""

    def fit(self, round_num: int, client_ids: list[int], global_adapter: Adapter) -> Iterable[Update | Failure]: ...


@dataclass
class Hooks:
    """How the loop reports progress; the CLI shows it with rich, tests leave it silent."""

    round_start: Callable[[int, list[int]], None] = lambda r, ids: None
    round_end: Callable[[dict], None] = lambda row: None


class RunDir:
    """Layout of a run directory; every write is atomic."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metrics = self.path / "metrics.jsonl"
        self.state = self.path / "state.json"

    def round_dir(self, r: int) -> Path:
        return self.path / "rounds" / f"round_{r:04d}"

    def read_state(self) -> dict | None:
        return json.loads(self.state.read_text()) if self.state.exists() else None

    def append(self, **event) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def events(self, kind: str | None = None) -> list[dict]:
        if not self.metrics.exists():
            return []
        rows = [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]
        return [r for r in rows if kind is None or r.get("event") == kind]

    def truncate_metrics(self, offset: int) -> None:
        """Drop lines written after the last completed round (a round cut short by a crash)."""
        if self.metrics.exists():
            with open(self.metrics, "r+b") as f:
                f.truncate(offset)


def check_update(u: Update, reference: Adapter) -> str | None:
    """Why an update must not enter aggregation, or None if it may."""
    if not isinstance(u.num_examples, int) or u.num_examples <= 0:
        return f"num_examples = {u.num_examples!r}, expected a positive whole number"
    if set(u.adapter) != set(reference):
        missing, extra = set(reference) - set(u.adapter), set(u.adapter) - set(reference)
        return f"adapter keys differ from the global adapter (missing {len(missing)}, unexpected {len(extra)})"
    for k, ref in reference.items():
        v = u.adapter[k]
        if tuple(v.shape) != tuple(ref.shape):
            return f"{k} has shape {tuple(v.shape)}, expected {tuple(ref.shape)}"
        if not torch.isfinite(v).all():
            return f"{k} contains NaN or Inf"
    return None


def run(cfg: Config, runtime: Runtime, run_dir: str | Path, *, client_ids: list[int], initial_adapter: Adapter,
        save_adapter: Callable[[Adapter, Path], None], evaluate: Callable[[Adapter], dict] | None = None,
        resume: bool = False, hooks: Hooks | None = None, meta: dict | None = None) -> Adapter:
    """Run (or resume) ``cfg.federation.rounds`` rounds; return the final global adapter."""
    hooks = hooks or Hooks()
    rd = RunDir(run_dir)
    fed = cfg.federation
    strategy = get_strategy(fed.strategy)
    k = max(1, round(fed.fraction * len(client_ids))) if fed.fraction > 0 else fed.clients_per_round
    if k > len(client_ids):
        raise FeditError(f"federation.clients_per_round = {k} but the partition has {len(client_ids)} clients; "
                         f"lower it or partition into more clients")

    state = rd.read_state() if resume else None
    if resume and state is None:
        raise FeditError(f"{rd.path} has no state.json: nothing to resume; start it with `fedit run` instead")
    if state:
        start = state["round"] + 1
        rd.truncate_metrics(state["metrics_offset"])
        global_adapter = load_adapter_file(rd.round_dir(state["round"]))
        log.info("resuming %s after round %d", rd.path, state["round"])
    else:
        if rd.path.exists() and (rd.state.exists() or rd.metrics.exists()):
            raise FeditError(f"run directory {rd.path} already holds a run; resume it with `fedit run --resume "
                             f"{rd.path}` or choose another run.out")
        (rd.path / "rounds").mkdir(parents=True, exist_ok=True)
        atomic_write(rd.path / "config.toml", config_mod.to_toml(cfg))
        atomic_write_json(rd.path / "run.json", {**(meta or {}), "clients": len(client_ids), "clients_per_round": k})
        start, global_adapter = 1, initial_adapter
        row = {"event": "round", "round": 0, "clients": [], "accepted": 0}
        if evaluate and cfg.eval.every:
            row["eval"] = evaluate(global_adapter)  # the untuned base model: the line to beat
        _finish_round(rd, 0, global_adapter, row, save_adapter)
        hooks.round_end(row)

    for r in range(start, fed.rounds + 1):
        t0 = time.perf_counter()
        selected = strategy.configure_round(r, client_ids, k, fed.seed)
        hooks.round_start(r, selected)
        rejected: list[dict] = []

        def accepted(updates: Iterable[Update | Failure]) -> Iterator[Update]:
            # A bad update is logged with its reason and left out: it never reaches the average.
            for u in updates:
                if isinstance(u, Failure):
                    rd.append(event="client", round=r, client=u.client_id, accepted=False, reason=u.reason)
                    log.warning("round %d: client %s dropped: %s", r, u.client_id, u.reason)
                    rejected.append({"client": u.client_id, "reason": u.reason})
                    continue
                problem = check_update(u, global_adapter)
                rd.append(event="client", round=r, client=u.client_id, num_examples=u.num_examples,
                          accepted=problem is None, reason=problem, **u.metrics)
                if problem:
                    log.warning("round %d: update of client %s rejected: %s", r, u.client_id, problem)
                    rejected.append({"client": u.client_id, "reason": problem})
                else:
                    yield u

        new_adapter, used = strategy.aggregate(global_adapter, accepted(runtime.fit(r, selected, global_adapter)))
        if used < fed.min_replies:
            raise FeditError(f"round {r}: only {used} valid client update(s), fewer than federation.min_replies = "
                             f"{fed.min_replies} (rejected: {rejected}); the run stopped after round {r - 1} and "
                             f"can be resumed with `fedit run --resume {rd.path}`")
        global_adapter = new_adapter
        row = {"event": "round", "round": r, "clients": selected, "accepted": used, "rejected": rejected,
               "train_seconds": round(time.perf_counter() - t0, 3)}
        if evaluate and cfg.eval.every and (r % cfg.eval.every == 0 or r == fed.rounds):
            t_eval = time.perf_counter()
            row["eval"] = evaluate(global_adapter)
            row["eval_seconds"] = round(time.perf_counter() - t_eval, 3)
        _finish_round(rd, r, global_adapter, row, save_adapter, t0)
        hooks.round_end(row)

    save_adapter(global_adapter, rd.path / "adapter")  # the final global adapter, where users look first
    return global_adapter


def _finish_round(rd: RunDir, r: int, adapter: Adapter, row: dict, save_adapter, t0: float | None = None) -> None:
    t = time.perf_counter()
    save_adapter(adapter, rd.round_dir(r))
    row["checkpoint_seconds"] = round(time.perf_counter() - t, 3)
    if t0 is not None:  # the round's wall time includes its checkpoint
        row["seconds"] = round(time.perf_counter() - t0, 3)
    rd.append(**row)
    atomic_write_json(rd.state, {"round": r, "metrics_offset": rd.metrics.stat().st_size,
                                 "adapter": str(rd.round_dir(r).relative_to(rd.path))})


def loss_curve(rd: RunDir) -> list[tuple[int, dict]]:
    """(round, eval) of every evaluated round, for plots and summaries."""
    return [(row["round"], row["eval"]) for row in rd.events("round") if "eval" in row and not math.isnan(row["eval"]["loss"])]
