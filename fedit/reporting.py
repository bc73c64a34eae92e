"""Watching a run: each committed round's figures to TensorBoard and/or Weights & Biases.

metrics.jsonl stays the run's record (resume and the plots read it). The reporters named in
``run.report_to`` get every round once it is committed, with its client rows, and log
scalars with the round as the step: a crashed round is never reported, a resumed run
carries on at the next round. Client metrics come from clients: they reach here cleaned at the
trust boundary (fedit/boundary.py), only finite numbers of the names below are reported, the
arithmetic on them guards itself (two clients can report seconds that sum to 0), and a
reporter that fails anyway is logged and skipped: watching a run never stops it.

Under ``privacy.enabled`` the reporters, which may send what they get off the machine (W&B),
get no per-client figure and nothing computed from what clients report alone: no ``client/*``
(each client's loss, steps, tokens, seconds), no ``train/*`` (their token-weighted loss and
throughput, unnoised) and no ``validation/client_*`` (the spread of the clients' own validation
losses). metrics.jsonl, on the server's machine, keeps every client line (docs/boundary.md).
"""

from __future__ import annotations

import logging
import math
import secrets
from pathlib import Path
from typing import Protocol

from fedit.errors import FeditError

log = logging.getLogger(__name__)

CLIENT_METRICS = ("train_loss", "steps", "trained_tokens", "seconds")


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def scalars(row: dict, clients: list[dict], private: bool = False) -> dict[str, float]:
    """Tag -> value for one round: held-out loss overall and per category, the round's time and
    bytes, the clients' token-weighted training loss and throughput, and each client's own figures
    (``private``: not those, see the module docstring)."""
    out: dict[str, float] = {}
    ev = row.get("eval")
    if ev and _number(ev.get("loss")) is not None:
        out["eval/loss"] = ev["loss"]
        out.update({f"eval_by_category/{c}": v for c, v in ev.get("by_category", {}).items()})
    val = row.get("validation")
    if val and _number(val.get("loss")) is not None:  # the clients' federated validation: overall, per category, spread
        out["validation/loss"] = val["loss"]
        out["validation/clients"] = val["clients"]
        if not private:
            out.update({f"validation/client_{k}": v for k, v in val["spread"].items()})
        out.update({f"validation_by_category/{c}": v for c, v in val.get("by_category", {}).items()})
    for key in ("seconds", "train_seconds", "eval_seconds"):
        if _number(row.get(key)) is not None:
            out[f"round/{key}"] = row[key]
    if row["round"] == 0:
        return out
    out["round/accepted"] = row["accepted"]
    out["round/rejected"] = len(row.get("rejected", []))
    out.update({f"privacy/{k}": v for k, v in row.get("privacy", {}).items() if _number(v) is not None})
    ok = [c for c in clients if c.get("accepted")]
    out["round/bytes_down"] = sum(c.get("bytes_down") or 0 for c in ok)
    out["round/bytes_up"] = sum(c.get("bytes_up") or 0 for c in ok)
    if private:
        return out
    out.update({f"drift/{k}": v for k, v in (row.get("drift") or {}).items() if _number(v) is not None})
    tokens = seconds = loss_sum = 0.0
    for c in ok:
        metrics = c.get("metrics")
        m = {k: _number(metrics.get(k)) if isinstance(metrics, dict) else None for k in CLIENT_METRICS}
        cid = f"{c['client']:05d}"
        for k, v in m.items():
            if v is not None:
                out[f"client/{cid}/{k}"] = v
        # only positive tokens and seconds count: a total of signed ones can be 0 (1e15 and -1e15) and divide by it
        if m["trained_tokens"] and m["seconds"] and m["trained_tokens"] > 0 and m["seconds"] > 0:
            out[f"client/{cid}/tokens_per_second"] = m["trained_tokens"] / m["seconds"]
            tokens, seconds = tokens + m["trained_tokens"], seconds + m["seconds"]
            if m["train_loss"] is not None:
                loss_sum += m["train_loss"] * m["trained_tokens"]
    if tokens and seconds and math.isfinite(tokens) and math.isfinite(seconds) and math.isfinite(loss_sum):
        out["train/loss"] = loss_sum / tokens
        out["train/tokens_per_second"] = tokens / seconds
        out["train/tokens"] = tokens
    return out


class Reporter(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class TensorBoard:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """One W&B run per fedit run; its id is kept in the run directory so --resume continues it."""

    def __init__(self, run_dir: Path, project: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise FeditError("run.report_to names 'wandb' but the wandb package is not installed: "
                             "pip install 'fedit[wandb]' (or drop it from run.report_to)") from None
        id_file = run_dir / "wandb" / "fedit-run-id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
        id_file.write_text(run_id)
        try:
            self.run = wandb.init(project=project, id=run_id, name=run_dir.name, dir=str(run_dir), config=config,
                                  resume="allow")
        except Exception as e:  # no network, no login: say what to do before any training starts
            raise FeditError(f"Weights & Biases could not start ({type(e).__name__}: {e}); log in with `wandb "
                             f"login`, or set WANDB_MODE=offline, or drop 'wandb' from run.report_to") from None

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Reporters:
    def __init__(self, reporters: list[Reporter], private: bool = False):
        self.reporters = reporters
        self.private = private  # privacy.enabled: no per-client figures leave through a reporter

    def round(self, row: dict, clients: list[dict]) -> None:
        if not self.reporters:
            return
        try:
            values = scalars(row, clients, self.private)
        except Exception as e:  # the round is committed already: a figure that cannot be formed is not worth the run
            log.warning("reporting round %s failed: %s: %s", row.get("round"), type(e).__name__, e)
            return
        for r in self.reporters:
            try:
                r.log(row["round"], values)
            except Exception as e:  # watching a run must never stop it
                log.warning("reporting round %d to %s failed: %s", row["round"], type(r).__name__, e)

    def __enter__(self) -> "Reporters":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for r in self.reporters:
            try:
                r.close()
            except Exception as e:
                log.warning("closing %s failed: %s", type(r).__name__, e)


def open_reporters(names: tuple[str, ...], run_dir: Path, project: str = "fedit",
                   config: dict | None = None, private: bool | None = None) -> Reporters:
    """The reporters ``names`` asks for; ``private`` (default: the config's privacy.enabled) keeps
    per-client figures out of them."""
    if private is None:
        private = bool(((config or {}).get("privacy") or {}).get("enabled"))
    out: list[Reporter] = []
    if "tensorboard" in names:
        out.append(TensorBoard(run_dir))
    if "wandb" in names:
        out.append(WandB(run_dir, project, config or {}))
    return Reporters(out, private)
