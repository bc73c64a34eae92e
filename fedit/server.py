"""The round loop, written once: select -> instruct -> train -> check -> aggregate -> evaluate -> checkpoint.

It knows nothing of how clients are reached: a runtime (in-process simulation,
Flower) turns the round's FitIns into an iterator of Updates (fedit.protocol),
and nothing of the algorithm: the strategy (fedit.strategies) selects,
instructs and aggregates. Each completed round leaves, in this order, the
round's PEFT adapter, the strategy's state, its metrics lines and then
``state.json``, the commit point. ``state.json`` also records, per client, the
last round whose update the server accepted: a client resumes its own state
(SCAFFOLD's control variate) from that round, so neither a crash mid-round nor
a rejected update ever leaves a client's state ahead of the server's. A run
killed at any instant resumes from the last round whose state.json was
written, and ends bit-identical to a run that was never interrupted, because
every random choice is seeded by (seed, round, client) and nothing else.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

from fedit import config as config_mod
from fedit import boundary, hetero, reporting
from fedit.checkpoint import atomic_write, atomic_write_json
from fedit.config import Config
from fedit.errors import FeditError
from fedit.adapter import Adapter, load_adapter_file
from fedit.aggregators import round_size
from fedit.boundary import check_update  # noqa: F401  (re-exported: it lived here)
from fedit.evaluation import federated
from fedit.protocol import CLIP, GLOBAL, EvalIns, Evaluation, Failure, FitIns, Summed, Update, nbytes
from fedit.strategies import build as build_strategy
from fedit.strategies.base import cover, prefixed, unprefixed

log = logging.getLogger(__name__)
PRIVACY = "privacy"  # prefix of the DP mechanism's state among the strategy's saved tensors


class Runtime(Protocol):
    """Trains the selected clients, one FitIns each; yields an Update per reply, or a Failure for a
    client that did not reply (the loop logs it and goes on without it). A runtime whose ``secure``
    is true yields instead one Summed, the sum of the changes that reached the server's aggregate."""

    secure: bool

    def fit(self, round_num: int, instructions: list[FitIns]) -> Iterable[Update | Failure]: ...

    def evaluate(self, round_num: int, instructions: list[EvalIns]) -> Iterable[Evaluation | Failure]:
        """Federated evaluation: each client's Evaluation of the global adapter on its validation split."""
        ...


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
        # Client data reaches here cleaned (fedit/boundary.py); should anything still be beyond JSON (bytes,
        # tuple keys, a container holding itself, an int of 5000 digits) or huge, the line is written in a
        # bounded form instead of being lost or stopping the run.
        try:
            line = json.dumps(event)
        except (TypeError, ValueError, RecursionError):
            line = None
        if line is None or len(line) > boundary.MAX_LINE:
            line = json.dumps(boundary.jsonable(event))
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(line + "\n")
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


def run(cfg: Config, runtime: Runtime, run_dir: str | Path, *, client_ids: list[int], initial_adapter: Adapter,
        save_adapter: Callable[[Adapter, Path], None], evaluate: Callable[[Adapter], dict] | None = None,
        resume: bool = False, hooks: Hooks | None = None, meta: dict | None = None,
        client_sizes: dict[int, int] | None = None, data_sha256: str | None = None,
        validation_sizes: dict[int, int] | None = None) -> Adapter:
    """Run (or resume) ``cfg.federation.rounds`` rounds; return the final global adapter.

    ``evaluate`` scores an adapter on the server's own test set (None: the server holds none);
    with data.client_validation the clients score it on their validation splits through
    ``runtime.evaluate`` (fedit.evaluation.federated), and keep_best and early stopping follow
    that figure, never the test set's.
    ``client_sizes`` (training records per client, where the server knows them: the partition
    manifest in-process) caps the example count a client may claim at size × local_epochs;
    ``validation_sizes`` likewise caps the examples an evaluation reply may claim.
    ``data_sha256`` (of the data files the server sees) is kept in run.json; a resume with
    other files is refused."""
    hooks = hooks or Hooks()
    rd = RunDir(run_dir)
    fed = cfg.federation
    strategy = build_strategy(cfg, len(client_ids))
    secure = getattr(runtime, "secure", False)  # it delivers the round's changes as one Summed
    plan = hetero.LoraPlan(cfg, hetero.client_loras(cfg, client_ids, {hetero.short_name(k) for k in initial_adapter}),
                           initial_adapter)
    k = round_size(fed, len(client_ids))
    if k > len(client_ids):
        raise FeditError(f"federation.clients_per_round = {k} but the partition has {len(client_ids)} clients; "
                         f"lower it or partition into more clients")
    dp = None
    if cfg.privacy.enabled:  # client-level DP: the strategy's changes are combined by its noised mean
        from fedit.privacy import ClientDP

        dp = strategy.privacy = ClientDP(cfg.privacy, k, len(client_ids), fed.rounds)
        if cfg.lora.freeze_a:
            dp.fixed = hetero.is_a
        meta = {**(meta or {}), "privacy": {"noise_multiplier": dp.z, "update_noise_multiplier": dp.z_delta,
                                            "expected_clients": dp.m, "sampling_rate": dp.q,
                                            **({"count_noise": dp.sigma_b} if dp.sigma_b else {})}}

    def example_cap(cid) -> int | None:
        caps = [math.ceil(client_sizes[cid] * cfg.train.local_epochs)] if client_sizes and cid in client_sizes else []
        return min(caps + ([fed.max_examples] if fed.max_examples else []), default=None)

    validating = bool(cfg.data.client_validation) and cfg.eval.every > 0
    if validating and cfg.privacy.enabled:
        log.warning("privacy.enabled: (ε, δ) covers the adapter updates only; each client's validation loss per "
                    "category reaches the server in the clear (docs/federated-evaluation.md)")
    patience = fed.early_stop_patience
    eval_cutoff = cfg.eval.cutoff_len or cfg.train.cutoff_len

    def federated_eval(r: int, adapter: Adapter) -> dict | None:
        """The clients' validation figures for ``adapter`` (None when no client scored a token)."""
        asked = federated.select(client_ids, cfg.eval.clients, fed.seed, r)
        results: list[Evaluation] = []
        left_out: list[dict] = []
        for e in runtime.evaluate(r, [EvalIns(r, cid, {GLOBAL: adapter}) for cid in asked]):
            cid = getattr(e, "client_id", None)
            if not isinstance(cid, int) or isinstance(cid, bool):  # whatever a runtime yields: a reason, not a crash
                problem, cid = f"an evaluation reply from client {type(cid).__name__} rather than an id", None
            elif isinstance(e, Failure):
                problem = str(e.reason)[:500]
            elif not isinstance(e, Evaluation) or cid not in asked or any(x.client_id == cid for x in results):
                problem = f"client {cid} was not asked for one evaluation"
            else:
                # the client's split where the server knows it, else the cap every reply has (federation.max_examples)
                cap = (validation_sizes or {}).get(cid, fed.max_examples or None)
                problem = federated.check(e, cap, eval_cutoff)
            if problem:
                log.warning("round %d: evaluation of client %s left out: %s", r, cid, problem)
                left_out.append({"client": cid, "reason": problem})
            else:
                results.append(e)
        figures = federated.combine(results)
        if figures is None:
            log.warning("round %d: no client scored a validation token (%d asked, %d left out)", r, len(asked),
                        len(left_out))
            return {"source": "validation (federated)", "clients": 0, "asked": len(asked), "left_out": left_out}
        return {**figures, "asked": len(asked), "left_out": left_out}

    state = rd.read_state() if resume else None
    if resume and state is None:
        raise FeditError(f"{rd.path} has no state.json: nothing to resume; start it with `fedit run` instead")
    if state:
        started = json.loads((rd.path / "run.json").read_text())
        started_on = started.get("data_sha256")
        if data_sha256 and started_on and data_sha256 != started_on:
            raise FeditError(f"the partition of this run changed since it started (sha256 {data_sha256[:12]} now, "
                             f"{started_on[:12]} then); resume with the partition it started with, or start a new run")
        then = started.get("client_loras")  # absent in runs of equal clients (and before fedit recorded it)
        changed = [f"client {c}: {then.get(c)} then, {v} now" for c, v in plan.table().items()
                   if then is not None and then.get(c) != v]
        if changed:  # lora.clients_file is read again on resume: an edited file must not silently change ranks
            raise FeditError(f"the clients' LoRA settings changed since this run started ({'; '.join(changed[:3])}"
                             f"{'; ...' if len(changed) > 3 else ''}); restore lora.clients_file, or start a new run")
        start = state["round"] + 1
        rd.truncate_metrics(state["metrics_offset"])
        global_adapter = load_adapter_file(rd.round_dir(state["round"]))
        if state.get("strategy_state"):
            saved = load_arrays(rd.path / state["strategy_state"])
            if dp is not None:
                dp.load_state_dict(unprefixed(PRIVACY, saved))
            strategy.load_state_dict({k: v for k, v in saved.items() if not k.startswith(PRIVACY + "/")})
        client_rounds = {int(c): r for c, r in state.get("client_rounds", {}).items()}
        best = state.get("best")
        if best and cfg.run.keep_best:  # best/ is written before state.json: a crash between them is undone here
            save_adapter(load_adapter_file(rd.round_dir(best["round"])), rd.path / "best")
        log.info("resuming %s after round %d", rd.path, state["round"])
    else:
        if rd.path.exists() and (rd.state.exists() or rd.metrics.exists()):
            raise FeditError(f"run directory {rd.path} already holds a run; resume it with `fedit run --resume "
                             f"{rd.path}` or choose another run.out")
        (rd.path / "rounds").mkdir(parents=True, exist_ok=True)
        atomic_write(rd.path / "config.toml", config_mod.to_toml(cfg))
        atomic_write_json(rd.path / "run.json", {**(meta or {}), "clients": len(client_ids), "clients_per_round": k,
                                                 "data_sha256": data_sha256,
                                                 **({"client_loras": plan.table()} if plan.clients else {})})
        start, global_adapter, client_rounds, best = 1, initial_adapter, {}, None

    def saved_state() -> Adapter:  # what a resume needs besides the adapter: the strategy's and DP's state
        return {**strategy.state_dict(), **(prefixed(PRIVACY, dp.state_dict()) if dp is not None else {})}

    def evaluated(r: int, row: dict) -> dict | None:
        """Score the round's adapter (test, validation); move ``best``; return the best's record if it moved."""
        nonlocal best
        t_eval = time.perf_counter()
        if evaluate:
            row["eval"] = evaluate(global_adapter)
        if validating:
            row["validation"] = federated_eval(r, global_adapter)
        row["eval_seconds"] = round(time.perf_counter() - t_eval, 3)
        loss = row.get("validation", {}).get("loss")
        if loss is None:  # no figure to choose on: the round neither improves nor counts against patience
            return None
        if best is None or loss < best["loss"]:
            best = {"round": r, "loss": loss, "since": 0}
            return best
        best = {**best, "since": best["since"] + 1}
        return None

    report = reporting.open_reporters(cfg.run.report_to, rd.path, cfg.run.wandb_project, cfg.to_dict())
    with report:
        if not state:
            row = {"event": "round", "round": 0, "clients": [], "accepted": 0}
            improved = evaluated(0, row) if cfg.eval.every else None  # the untuned base model: the line to beat
            _finish_round(rd, 0, global_adapter, row, save_adapter, saved_state(), client_rounds, best=best,
                          keep_best=improved is not None and cfg.run.keep_best)
            hooks.round_end(row)
            report.round(row, [])
        draw = cover if fed.selection == "cover" else strategy.select
        mapped = plan.active and plan.mode == "factors"  # a client's slices are put back into the global's shape
        for r in range(start, fed.rounds + 1):
            over = dp.over_budget(r) if dp is not None else None
            if not over and patience and best and best["since"] >= patience:
                over = (f"early stop: {best['since']} evaluations without a lower validation loss than round "
                        f"{best['round']}'s {best['loss']:.4f} (federation.early_stop_patience = {patience})")
            if over:  # before the round that would spend more than privacy.max_epsilon, or after patience ran out
                log.warning(over)
                rd.append(event="stop", round=r - 1, reason=over)
                break
            t0 = time.perf_counter()
            pool = client_ids
            if hasattr(runtime, "available") and dp is None:  # a deployment: pick among the sites connected now
                here = set(runtime.available(r, k))
                pool = [c for c in client_ids if c in here] or client_ids  # none: the round fails and says why
            selected = dp.select(client_ids) if dp is not None and dp.q is not None else \
                draw(r, pool, min(k, len(pool)), fed.seed)
            hooks.round_start(r, selected)
            instructions = [strategy.configure(r, cid, global_adapter, client_rounds.get(cid, 0)) for cid in selected]
            if dp is not None and secure:  # the server never sees a single change: each client clips its own
                instructions = [replace(ins, config={**ins.config, CLIP: dp.clip}) for ins in instructions]
            if plan.active:  # each client gets its own rank and modules of the global adapter
                instructions = [plan.down(ins) for ins in instructions]
            sent = {ins.client_id: ins for ins in instructions}
            drift = Drift()
            down = {cid: nbytes(ins.arrays) for cid, ins in sent.items()}
            rejected: list[dict] = []
            accepted_ids: list[int] = []
            client_rows: list[dict] = []

            def log_client(**event) -> None:
                rd.append(event="client", round=r, **event)
                client_rows.append(event)

            def accepted(updates: Iterable[Update | Failure]) -> Iterator[Update]:
                # A bad reply is logged with its reason and left out: it never reaches the aggregate, and what
                # goes on (aggregate, metrics.jsonl, reporters) gets the clean copy fedit/boundary.py makes.
                # What the runtime itself raises still stops the round; what a reply makes a check raise does not.
                for u in updates:
                    try:
                        ok = summed(u) if isinstance(u, Summed) else screened(u)
                    except Exception as e:
                        problem = f"the reply could not be checked ({boundary.describe(e, 200)})"
                        log_client(client=None, accepted=False, reason=problem)
                        log.warning("round %d: a reply was rejected: %s", r, problem)
                        rejected.append({"client": None, "reason": problem})
                        continue
                    if ok is not None:
                        yield ok

            def screened(u) -> Update | None:
                if isinstance(u, Failure):
                    cid, reason = boundary.scalar(u.client_id), boundary.text(u.reason)
                    log_client(client=cid, accepted=False, reason=reason)
                    log.warning("round %d: client %s dropped: %s", r, cid, reason)
                    rejected.append({"client": cid, "reason": reason})
                    return None
                if not isinstance(u, Update):
                    problem = f"the runtime yielded a {type(u).__name__}, not an Update"
                    log_client(client=None, accepted=False, reason=problem)
                    log.warning("round %d: a reply was rejected: %s", r, problem)
                    rejected.append({"client": None, "reason": problem})
                    return None
                cid = u.client_id
                ins = sent.get(cid) if boundary.is_id(cid) else None
                metrics, dropped = boundary.clean_metrics(u.metrics)
                clean, out = None, None
                if ins is None or cid in accepted_ids:
                    problem = f"client {boundary.describe(cid)} was not asked for one update this round"
                else:  # checked against what this client was sent: its own rank and modules
                    clean, problem = boundary.screen_update(u, ins.global_adapter, strategy.reply_groups,
                                                            max_examples=example_cap(cid), max_value=fed.max_value)
                extra = {"rank": plan.profile(cid).r, "trainable_params": sum(
                    v.numel() for v in ins.global_adapter.values())} if ins else {}
                if clean is not None:
                    # ‖θ_k − θ‖ before any bound: what max_update_norm and privacy.clipping_norm act on
                    extra["update_norm"] = update_norm(clean.adapter, ins.global_adapter)
                    out = plan.up(clean, global_adapter) if mapped else clean
                    # each change against where that client started: product mode sends a re-split of the
                    # global (the same product, other factors), and against the stored factors every change
                    # would share that difference and point the same way (mean cosine 1.0, measured)
                    drift.add(out.adapter, global_adapter if mapped else ins.global_adapter)
                if dropped:
                    extra["metrics_dropped"] = boundary.summary(dropped)
                    log.warning("round %d: client %s: %d metric(s) dropped: %s", r, boundary.describe(cid),
                                len(dropped), "; ".join(boundary.summary(dropped)[:2]))
                n = u.num_examples  # logged as sent when it is a plain count, left out (the reason names it) if not
                log_client(client=cid if ins else boundary.scalar(cid),
                           **({"num_examples": n} if boundary.is_id(n) and abs(n) <= 2**63 else {}),
                           accepted=clean is not None, reason=problem, bytes_down=down.get(cid, 0) if ins else 0,
                           bytes_up=nbytes(clean.arrays) if clean else None, **extra, metrics=metrics)
                if clean is None:
                    log.warning("round %d: update of client %s rejected: %s", r, boundary.describe(cid), problem)
                    rejected.append({"client": cid if ins else boundary.scalar(cid), "reason": problem})
                    return None
                accepted_ids.append(cid)
                return out

            def summed(u: Summed) -> Summed | None:
                # Secure aggregation: the sum is checked as a whole (its clients, shapes, finite); its clients are
                # logged with what each reported in the clear; it enters aggregation whole or not at all.
                named = boundary.summed_clients(u.clients, sent, accepted_ids)
                clean, problem = None, named.problem
                if problem is None:
                    clean, problem = boundary.screen_summed(u, named.ids, sent[named.ids[0]].global_adapter)
                metrics = boundary.summed_metrics(u.metrics, named.ids)
                for c in named.ids or [None]:
                    m, dropped = metrics.get(c, ({}, []))
                    log_client(client=c, accepted=problem is None, reason=problem, secure=True,
                               bytes_down=down.get(c, 0), metrics=m,
                               **({"metrics_dropped": boundary.summary(dropped)} if dropped else {}))
                if problem:
                    log.warning("round %d: the securely aggregated sum of clients %s rejected: %s", r, named.ids,
                                problem)
                    rejected.extend({"client": c, "reason": problem} for c in named.ids or [None])
                    return None
                accepted_ids.extend(named.ids)
                clean.metrics = {c: m for c, (m, _) in metrics.items()}
                return clean

            replies = accepted(runtime.fit(r, instructions))
            if plan.mode == "product":
                new_adapter, used = plan.product_mean(global_adapter, replies)
            else:
                new_adapter, used = strategy.aggregate(r, global_adapter, replies)
            # Under DP an empty Poisson sample is a round (it releases noise), and so is a secure round with
            # fewer than three clients (too few to hide one change: it is not used).
            if used < fed.min_replies and not (dp is not None and (not selected or secure and len(selected) < 3)):
                raise FeditError(f"round {r}: only {used} valid client update(s), fewer than federation.min_replies = "
                                 f"{fed.min_replies} (rejected: {rejected}); the run stopped after round {r - 1} and "
                                 f"can be resumed with `fedit run --resume {rd.path}`")
            global_adapter = new_adapter
            client_rounds.update({cid: r for cid in accepted_ids})
            row = {"event": "round", "round": r, "clients": selected, "accepted": used, "rejected": rejected,
                   "train_seconds": round(time.perf_counter() - t0, 3)}
            if len(pool) < len(client_ids):  # the sites that could be picked: those connected at the round's start
                row["available"] = pool
            if dp is not None:
                row["privacy"] = dict(dp.last_report)
            spread = drift.figures(client_rows)
            if spread:  # measured client drift: the mean cosine between the round's changes, their norms
                row["drift"] = spread
            if strategy.derived():  # settings the strategy took from the data (FedAdam's tau and eta)
                row["strategy"] = strategy.derived()
            if strategy.kept_clients is not None:
                row["kept"] = strategy.kept_clients  # Krum / Multi-Krum: whose changes made the round's step
            improved = None
            if cfg.eval.every and (r % cfg.eval.every == 0 or r == fed.rounds):
                improved = evaluated(r, row)
            _finish_round(rd, r, global_adapter, row, save_adapter, saved_state(), client_rounds, t0, best=best,
                          keep_best=improved is not None and cfg.run.keep_best)
            hooks.round_end(row)
            report.round(row, client_rows)
    save_adapter(global_adapter, rd.path / "adapter")  # the final global adapter, where users look first
    return global_adapter


class Drift:
    """How far apart the round's accepted client changes point: the mean cosine over pairs of them, from one
    streamed sum of their unit vectors (Σ_{i<j} cos(Δ_i, Δ_j) = (‖Σ u_k‖² − K) / 2 with u_k = Δ_k / ‖Δ_k‖), so
    a round holds one extra adapter-sized accumulator, not every change. 1: all alike; 0: unrelated."""

    def __init__(self):
        self.acc: Adapter = {}
        self.k = 0
        self.usable = True  # changes of different shapes (clients' own ranks in product mode) are not comparable

    def add(self, adapter: Adapter, reference: Adapter) -> None:
        shapes = {k: v.shape for k, v in reference.items()}
        if not self.usable or {k: v.shape for k, v in adapter.items()} != shapes or (
                self.acc and {k: v.shape for k, v in self.acc.items()} != shapes):
            self.usable = False
            return
        delta = {k: adapter[k].double() - reference[k].double() for k in sorted(reference)}
        norm = math.sqrt(sum(float(v.pow(2).sum()) for v in delta.values()))
        if norm == 0:
            return
        for k, v in delta.items():
            self.acc[k] = self.acc[k] + v / norm if k in self.acc else v / norm
        self.k += 1

    def figures(self, client_rows: list[dict]) -> dict | None:
        """{"mean_cosine", "clients", "norm_min", "norm_median", "norm_max"} of the round; None below 2 changes."""
        if not self.usable or self.k < 2:
            return None
        from statistics import median

        total = sum(float(v.pow(2).sum()) for v in self.acc.values())
        norms = [c["update_norm"] for c in client_rows if c.get("accepted") and "update_norm" in c]
        return {"mean_cosine": (total - self.k) / (self.k * (self.k - 1)), "clients": self.k,
                "norm_min": min(norms), "norm_median": median(norms), "norm_max": max(norms)}


def update_norm(adapter: Adapter, reference: Adapter) -> float:
    """The L2 norm of a client's change over all its tensors, in float64, summed in name order (a resumed
    run reads the adapter from a file, in another order, and must log the same number)."""
    return math.sqrt(sum(float((adapter[k].double() - reference[k].double()).pow(2).sum()) for k in sorted(reference)))


def save_arrays(arrays: Adapter, path: Path) -> None:
    from safetensors.torch import save

    atomic_write(path, save({k: v.contiguous() for k, v in arrays.items()}))


def load_arrays(path: Path) -> Adapter:
    from safetensors.torch import load_file

    return load_file(path)


def _finish_round(rd: RunDir, r: int, adapter: Adapter, row: dict, save_adapter, strategy_state: Adapter,
                  client_rounds: dict, t0: float | None = None, best: dict | None = None,
                  keep_best: bool = False) -> None:
    t = time.perf_counter()
    save_adapter(adapter, rd.round_dir(r))
    if keep_best:  # this round has the lowest validation loss so far; committed with state.json below
        save_adapter(adapter, rd.path / "best")
    state_file = None
    if strategy_state:  # before state.json: the round is committed only once everything it needs is on disk
        state_file = Path("strategy") / f"round_{r:04d}.safetensors"
        (rd.path / "strategy").mkdir(exist_ok=True)
        save_arrays(strategy_state, rd.path / state_file)
    row["checkpoint_seconds"] = round(time.perf_counter() - t, 3)
    if t0 is not None:  # the round's wall time includes its checkpoint
        row["seconds"] = round(time.perf_counter() - t0, 3)
    rd.append(**row)
    atomic_write_json(rd.state, {"round": r, "metrics_offset": rd.metrics.stat().st_size,
                                 "adapter": str(rd.round_dir(r).relative_to(rd.path)),
                                 "strategy_state": str(state_file) if state_file else None,
                                 "client_rounds": {str(c): cr for c, cr in sorted(client_rounds.items())},
                                 "best": best})
    for old in (rd.path / "strategy").glob("round_*.safetensors"):  # only the committed one is ever read again
        if state_file is None or old.name != state_file.name:
            old.unlink(missing_ok=True)


def loss_curve(rd: RunDir, key: str = "eval") -> list[tuple[int, dict]]:
    """(round, figures) of every evaluated round, for plots and summaries: ``eval`` the server's test set,
    ``validation`` the clients' federated validation."""
    return [(row["round"], row[key]) for row in rd.events("round")
            if isinstance(row.get(key), dict) and "loss" in row[key] and not math.isnan(row[key]["loss"])]


def plot_run(rd: RunDir) -> None:
    """loss.png of a run: its test curve and its federated validation curve, whichever it has."""
    from fedit.evaluation.plots import plot_loss

    plot_loss(loss_curve(rd), rd.path / "loss.png", validation=loss_curve(rd, "validation"))


def traffic_by_rank(client_rows: list[dict]) -> dict[int, dict]:
    """Per LoRA rank: how many accepted client updates (``RunDir.events("client")``), and the mean bytes
    each got and sent."""
    tiers: dict[int, list[tuple[int, int]]] = {}
    for row in client_rows:
        if row.get("accepted") and "rank" in row:
            tiers.setdefault(row["rank"], []).append((row.get("bytes_down") or 0, row.get("bytes_up") or 0))
    return {r: {"updates": len(t), "bytes_down": sum(d for d, _ in t) / len(t), "bytes_up": sum(u for _, u in t) / len(t)}
            for r, t in sorted(tiers.items())}
