"""What one site (a Flower SuperNode's machine) does for a round, and the worker that keeps its model warm.

``SiteWork`` is a site's side of the protocol: given the config the server sent and a
FitIns (or an EvalIns), it reads the site's own data file, holds back the same
validation split as the simulation (fedit.data.partition.split_validation), trains or
scores, and keeps its client algorithm's state (SCAFFOLD's control variate) in a
state store. The Flower ClientApp (fedit/runtime/flower.py) uses it in two ways:

- in the ClientApp's own process (a plain ``flower-supernode``, Flower's simulation):
  Flower starts a fresh process per message, so the base model is loaded per message
  and the state lives in Flower's in-memory node context;
- through a worker (``fedit site``): a long-lived process per site that loads the base
  model once and keeps it between rounds and between runs with the same model, LoRA
  settings and seed (the seeded LoRA init is part of what it keeps), with the state on the site's disk (``--state``), so a site that is stopped
  and started again resumes where it was. Each ClientApp process hands its message to
  the worker over a local socket (Python's multiprocessing.connection: a Unix socket
  with an HMAC challenge on a key only the site's user can read) and relays the
  answer. flwr 1.41 and 1.42 both start a new ClientApp process per message (isolation
  "subprocess" or "process"); neither keeps a ClientApp alive, hence the worker.

Nothing here imports flwr.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fedit import config as config_mod
from fedit.config import Config
from fedit.errors import FeditError
from fedit.protocol import Arrays, EvalIns, Evaluation, FitIns, Update

log = logging.getLogger("fedit.site")

_MODEL_CACHE: dict[tuple, object] = {}  # one model per process: survives as long as the process does


def load_model(cfg: Config, model_name: str):
    """The base model with the run's LoRA attached (seeded init), kept while the model and LoRA settings stay."""
    from fedit.model import attach_lora, load_base

    mcfg = config_mod.ModelConfig(**{**cfg.to_dict()["model"], "name": model_name})
    key = (repr(mcfg), repr(cfg.lora), cfg.federation.seed)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        loaded = load_base(mcfg)
        attach_lora(loaded, cfg.lora, cfg.federation.seed)
        _MODEL_CACHE[key] = loaded
    return _MODEL_CACHE[key]


class StateStore(Protocol):
    """A client algorithm's state, versioned by the round that made it (fedit.runtime.simulation.ClientStateDir)."""

    def load(self, client_id: int, round_num: int) -> Arrays | None: ...
    def save(self, client_id: int, round_num: int, state: Arrays, keep: int) -> None: ...


def check_data(path: Path) -> tuple[list, list[str]]:
    """(the usable records, the report lines) of a site's data file, as `fedit partition` reports rows; a file
    with no usable record is an error that names it."""
    from fedit.data.records import load_records

    if not path.is_file():
        raise FeditError(f"--data {path}: no such file; pass the site's JSON or JSONL file of records")
    try:
        loaded = load_records(path)
    except FeditError as e:  # no usable row at all: the reasons, row by row, and that nothing left the site
        raise FeditError(f"{e}; nothing was sent to the server") from None
    lines = [f"read {len(loaded.records)} records from {path}; {loaded.skipped_summary()}"]
    lines += [f"  line {line}: {why}" for line, why in loaded.skipped[:20]]
    if len(loaded.skipped) > 20:
        lines.append(f"  ... and {len(loaded.skipped) - 20} more (see fedit partition --data {path})")
    return loaded.records, lines


@dataclass
class SiteWork:
    """A site's work for the server's messages: its data file, its state store, its model."""

    data: Path
    states: StateStore
    model: str | None = None  # a local copy of the base model to use instead of cfg.model.name

    def _records(self, cfg: Config, cid: int) -> tuple[list, list]:
        from fedit.data.partition import split_validation
        from fedit.data.records import load_records

        records = load_records(self.data).records
        train, val = split_validation(len(records), cfg.data.client_validation, cfg.data.seed, cid)
        return [records[i] for i in train], [records[i] for i in val]

    def train(self, cfg: Config, ins: FitIns, t0: float | None = None) -> tuple[Update, float]:
        """(the Update, seconds before training: from ``t0``, the message's arrival, to a model ready; imports
        and loading in a fresh process, finding it in a warm one)."""
        t0 = time.perf_counter() if t0 is None else t0
        from fedit import client
        from fedit.data.batches import tokenize
        from fedit.protocol import STATE_ROUND
        from fedit.strategies import STRATEGIES

        loaded = load_model(cfg, self.model or cfg.model.name)
        load_seconds = time.perf_counter() - t0
        t, cid = cfg.train, ins.client_id
        examples = tokenize(self._records(cfg, cid)[0], loaded.tokenizer, t.cutoff_len, t.train_on_inputs,
                            cfg.data.template)
        if not examples:
            raise FeditError(f"{self.data} holds no usable training records")
        algorithm = STRATEGIES[cfg.federation.strategy].client_algorithm
        kept = int(ins.config.get(STATE_ROUND, 0)) if algorithm.stateful else 0
        state = self.states.load(cid, kept) if kept else None
        update, new_state = client.train(loaded, ins, examples, t, client.seed_for(cfg.federation.seed, ins.round, cid),
                                         algorithm, state)
        if new_state is not None:
            self.states.save(cid, ins.round, new_state, keep=kept)
        update.metrics["load_seconds"] = round(load_seconds, 3)
        return update, load_seconds

    def evaluate(self, cfg: Config, ins: EvalIns, t0: float | None = None) -> tuple[Evaluation, float]:
        """(the Evaluation, seconds before scoring, counted as in ``train``)."""
        t0 = time.perf_counter() if t0 is None else t0
        from fedit.data.batches import tokenize
        from fedit.runtime.simulation import evaluate_client

        loaded = load_model(cfg, self.model or cfg.model.name)
        load_seconds = time.perf_counter() - t0
        t = cfg.train
        examples = tokenize(self._records(cfg, ins.client_id)[1], loaded.tokenizer, cfg.eval.cutoff_len or t.cutoff_len,
                            t.train_on_inputs, cfg.data.template)
        return evaluate_client(loaded, ins, examples, cfg), load_seconds


# ---------------------------------------------------------------- the warm worker of `fedit site`

def worker_key(path: Path) -> bytes:
    """The worker's key: made once, readable by the site's user only."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    return path.read_bytes()


def _to_torch(groups: dict) -> dict:
    import torch

    return {g: {k: torch.from_numpy(v.copy()) for k, v in arrays.items()} for g, arrays in groups.items()}


def _to_numpy(groups: dict) -> dict:
    return {g: {k: v.detach().cpu().contiguous().numpy() for k, v in arrays.items()} for g, arrays in groups.items()}


def handle(work: SiteWork, request: dict, say=print) -> dict:
    """One request from a ClientApp process: {"kind": "train" | "evaluate", "config", "round", "client_id",
    "fitins", "arrays"} -> {"arrays", "num_examples", "metrics"} / {"evaluation"}, or {"error": why}."""
    t0 = time.perf_counter()
    try:
        cfg = config_mod.from_dict(tomllib.loads(request["config"]), "the fedit config sent by the server")
        kind, r, cid = request["kind"], int(request["round"]), int(request["client_id"])
        if kind == "evaluate":
            e, load_seconds = work.evaluate(cfg, EvalIns(r, cid, _to_torch(request["arrays"])), t0)
            say(f"round {r}: evaluated as client {cid} (model ready in {load_seconds:.3f} s); sending the loss sums "
                f"of {e.examples} validation records in {len(e.by_category)} categories")
            return {"evaluation": {"by_category": e.by_category, "examples": e.examples}}
        say(f"round {r}: training as client {cid}")
        update, load_seconds = work.train(cfg, FitIns(r, cid, _to_torch(request["arrays"]), dict(request["fitins"])),
                                          t0)
        from fedit.protocol import nbytes

        say(f"round {r}: trained as client {cid} on {update.num_examples} examples (model ready in "
            f"{load_seconds:.3f} s); sending {nbytes(update.arrays) / 2**20:.2f} MB of adapter arrays "
            f"({', '.join(update.arrays)}) and metrics {', '.join(sorted(update.metrics))}")
        return {"arrays": _to_numpy(update.arrays), "num_examples": update.num_examples, "metrics": update.metrics}
    except FeditError as e:
        return {"error": str(e)}
    except Exception as e:  # reported to the server as this round's failure; the worker stays up
        log.exception("the site's worker failed on a request")
        return {"error": f"{type(e).__name__}: {e}"}


class Worker:
    """Serves the ClientApp processes of one site from a Unix socket, one request at a time (one model)."""

    def __init__(self, work: SiteWork, address: Path, key: bytes, say=print):
        from multiprocessing.connection import Listener

        address.unlink(missing_ok=True)
        self.work, self.say = work, say
        self.listener = Listener(str(address), family="AF_UNIX", authkey=key)
        os.chmod(address, 0o600)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.stopped = threading.Event()

    def start(self) -> "Worker":
        self.thread.start()
        return self

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn = self.listener.accept()
            except Exception:  # closed (stop) or a peer that failed the key challenge
                if self.stopped.is_set():
                    return
                continue
            with conn:
                try:
                    request = conn.recv()
                    conn.send(handle(self.work, request, self.say))
                except (EOFError, OSError):  # the ClientApp process went away mid-request
                    continue

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()


def call(address: str, key: bytes, request: dict, timeout: float = 5.0) -> dict:
    """From a ClientApp process: hand a request to the site's worker and wait for its answer."""
    from multiprocessing.connection import Client

    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = Client(address, family="AF_UNIX", authkey=key)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise FeditError(f"the site's worker does not answer at {address}: is `fedit site` running?") from None
            time.sleep(0.2)
    with conn:
        conn.send(request)
        return conn.recv()
