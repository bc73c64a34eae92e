"""The server's trust boundary: what a client reply must be before anything after it reads it.

Everything a runtime hands the round loop came from a client (or from a runtime a deployment
wrote itself), so it is checked here once and only clean copies go further:

- ``check_update`` / ``screen_update``: the fields the server relies on. Every array group the
  strategy expects holds exactly the global adapter's keys, as plain dense tensors on the
  adapter's device, of dtype float16, bfloat16, float32 or float64, of the adapter's shapes,
  finite and within ``federation.max_value``; the example count is a whole number from 1 to the
  client's cap (its size × local_epochs, or federation.max_examples), and never above 2**53 (the
  largest count a float64 weight holds exactly) when the server knows no cap. ``screen_update``
  returns a copy that holds only those: plain ``int`` count, the adapter's own key strings,
  detached tensors.
- ``clean_metrics``: a client's free-form metrics, kept apart from those fields. At most
  ``MAX_METRICS`` entries with plain keys (``KEY``: letters, digits and ``_ . - / :``, at most 64
  characters); values finite numbers within ±``MAX_ABS`` (bools kept) or printable text of at most
  ``MAX_TEXT`` characters; the names the server's own code reads as numbers (``NUMERIC``) must be
  numbers. Anything else is dropped with a reason; the reply itself is not rejected for it.
  metrics.jsonl and the reporters see only what is left.
- ``flower_metrics``: the same for the ``metrics`` record of a Flower reply.
- ``jsonable``: a bounded JSON form of anything, for the run's log when a line could not be
  written as it is.

Nothing here raises on what a client sent: every function gives a value and, for what it
refused, a reason. docs/boundary.md says what this does and does not guarantee.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import torch

from fedit.protocol import ADAPTER, Summed, Update

MAX_EXAMPLES = 2**53  # without a cap: a count above this is no count (and no float64 weight holds it exactly)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what the aggregate can read exactly

MAX_METRICS = 64
MAX_ABS = 1e15  # a metric's magnitude: beyond it no timing, loss or count is meant, and sums of 64 stay exact-ish
MAX_TEXT = 256
KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/\-]{0,63}", re.ASCII)
# Names fedit's own code reads as numbers (reporting, summaries): text there is dropped, not kept.
NUMERIC = frozenset({"train_loss", "steps", "trained_tokens", "seconds", "load_seconds", "examples_shortened",
                     "secagg_clipped_values", "prox_ratio"})
MAX_REASONS = 5  # per reply, in metrics.jsonl: the first ones, then a count


def describe(x, limit: int = 40) -> str:
    """A short, printable description of anything (never raises): its repr cut to ``limit``
    characters; a huge int by its size (Python refuses to print one of more than 4300 digits)."""
    try:
        if isinstance(x, int) and not isinstance(x, bool) and int.bit_length(x) > 64:
            return f"an integer of {int.bit_length(x)} bits"
        if isinstance(x, (str, bytes, list, tuple)) and len(x) > 10 * limit:  # repr only what is shown
            x = x[:limit + 1]
        elif isinstance(x, (dict, set, frozenset)) and len(x) > 10 * limit:
            return f"a {type(x).__name__} of {len(x)} entries"
        text = repr(x)
    except Exception:  # a repr that raises is the client's problem, not the server's
        text = f"<{type(x).__name__}>"
    text = "".join(c if c.isprintable() else "?" for c in text[:limit + 1])
    return text if len(text) <= limit else text[:limit - 3] + "..."


def text(x, limit: int = 500) -> str:
    """A reason or message from a runtime as bounded printable text."""
    if type(x) is not str:
        return describe(x, limit)
    return "".join(c if c.isprintable() else "?" for c in x[:limit]) + ("..." if len(x) > limit else "")


def scalar(x):
    """``x`` itself if it is a JSON scalar that says what it is in a few characters, else its description."""
    if x is None or type(x) is bool or (type(x) is int and abs(x) <= 2**63) or (type(x) is float and math.isfinite(x)):
        return x
    return describe(x)


def is_id(x) -> bool:
    """A client id: a plain int (a bool is not one)."""
    return type(x) is int


# ---------------------------------------------------------------- updates

def check_update(u: Update, reference, groups: tuple[str, ...] = (ADAPTER,), *,
                 max_examples: int | None = None, max_value: float = float("inf")) -> str | None:
    """Why an update must not enter aggregation, or None if it may (see the module docstring).
    Anything a client can send, of any type, gives a reason, never an error."""
    return screen_update(u, reference, groups, max_examples=max_examples, max_value=max_value)[1]


def screen_update(u: Update, reference, groups: tuple[str, ...] = (ADAPTER,), *, max_examples: int | None = None,
                  max_value: float = float("inf")) -> tuple[Update | None, str | None]:
    """(a clean copy of ``u``, None), or (None, why it is rejected). The copy has a plain int count,
    the reference's key strings, detached tensors and clean metrics; nothing else of ``u``."""
    try:
        problem = _count_problem(u.num_examples, max_examples)
        arrays = None if problem else _clean_arrays(u.arrays, reference, groups, max_value)
        if isinstance(arrays, str):
            problem, arrays = arrays, None
    except Exception as e:  # the checks guard each step; this is for what a hostile object's methods do
        return None, f"the update could not be checked ({type(e).__name__}: {describe(str(e), 120)})"
    if problem:
        return None, problem
    metrics, _ = clean_metrics(getattr(u, "metrics", None))
    return Update(u.client_id, arrays, int.__int__(u.num_examples), metrics), None


def _count_problem(n, cap: int | None) -> str | None:
    if type(n) is not int:  # a bool, a float, an int subclass that could lie in comparisons: no count
        return f"num_examples = {describe(n)}, expected a positive whole number"
    if n <= 0:
        return f"num_examples = {describe(n)}, expected a positive whole number"
    if cap is not None and n > cap:
        return f"num_examples = {describe(n)} is more than this client can have trained on ({cap})"
    if n > MAX_EXAMPLES:
        return f"num_examples = {describe(n)} is beyond 2**53, more than any client trains on"
    return None


def _clean_arrays(groups_in, reference, groups: tuple[str, ...], max_value: float) -> dict | str:
    if not isinstance(groups_in, dict) or set(groups_in) != set(groups):
        got = sorted(k if type(k) is str and len(k) <= 40 else describe(k) for k in itertools.islice(groups_in, 10)) \
            if isinstance(groups_in, dict) \
            else type(groups_in).__name__
        return f"array groups {got}, expected {sorted(groups)}"
    out = {}
    for group in groups:
        arrays = groups_in[group]
        if not isinstance(arrays, dict) or set(arrays) != set(reference):
            keys = set(arrays) if isinstance(arrays, dict) else set()
            missing, extra = set(reference) - keys, keys - set(reference)
            return f"{group}: keys differ from the global adapter (missing {len(missing)}, unexpected {len(extra)})"
        clean = {}
        for k, ref in reference.items():
            v = arrays[k]
            problem = _tensor_problem(v, ref, max_value)
            if problem:
                return f"{group}: {k} {problem}"
            clean[k] = v.detach()
        out[group] = clean
    return out


def _tensor_problem(v, ref: torch.Tensor, max_value: float) -> str | None:
    # In this order: what decides whether the later checks can run at all comes first (a meta tensor
    # has no values to test, a sparse or float8 one has no isfinite).
    if not isinstance(v, torch.Tensor):
        return f"is a {type(v).__name__}, not a tensor"
    if type(v) not in (torch.Tensor, torch.nn.Parameter):  # a subclass can redefine every operation
        return f"is a {type(v).__name__}, not a plain tensor"
    if v.layout != torch.strided or v.is_nested or v.is_quantized:
        return f"has layout {str(v.layout).replace('torch.', '')}{' (nested)' if v.is_nested else ''}, expected dense"
    if v.device != ref.device:
        return f"is on device {v.device}, expected {ref.device}"
    if v.dtype not in DTYPES:
        what = "floating point" if not v.dtype.is_floating_point else "float16, bfloat16, float32 or float64"
        return f"has dtype {str(v.dtype).replace('torch.', '')}, expected {what}"
    if tuple(v.shape) != tuple(ref.shape):
        return f"has shape {tuple(v.shape)}, expected {tuple(ref.shape)}"
    v = v.detach()
    if not bool(torch.isfinite(v).all()):
        return "contains NaN or Inf"
    largest = float(v.abs().max()) if v.numel() else 0.0
    if largest > max_value:
        return f"holds values up to {largest:.3g}, beyond federation.max_value = {max_value:g}"
    return None


# ---------------------------------------------------------------- secure aggregation's sums

@dataclass
class Named:
    """Which clients a Summed names, as far as they can be told: ``ids`` the plain ints among them
    (at most the round's size are kept), ``problem`` what is wrong with the list, if anything."""

    ids: list[int]
    problem: str | None


def summed_clients(clients, sent, accepted: list[int]) -> Named:
    """The clients of a secure sum: a list of distinct client ids, each asked this round and not
    yet counted; anything else names the problem (the sum is then not used)."""
    try:
        if not isinstance(clients, (list, tuple)):
            return Named([], f"its clients are a {type(clients).__name__}, not a list")
        head = [c for c in clients[:len(sent) + 1] if is_id(c)]  # one more than asked is enough to tell
        ids = sorted({c for c in head if c in sent})
        if len(set(head)) != len(head):
            return Named(ids, "the sum names a client more than once")
        if len(clients) > len(sent) or len(ids) != len(clients) or not ids or any(c in accepted for c in ids):
            return Named(ids, "the sum names clients that were not asked for one update this round")
        return Named(ids, None)
    except Exception as e:
        return Named([], f"its clients could not be read ({type(e).__name__})")


def screen_summed(u: Summed, ids: list[int], reference) -> tuple[Summed | None, str | None]:
    """(a clean copy of the sum of ``ids``' changes, None) or (None, why it is not used). The sum holds
    the adapter group only; ``unclipped`` (DP's count of unclipped changes) is None or a finite
    number from 0 to the clients' count."""
    checked, problem = screen_update(Update(-1, getattr(u, "arrays", None), len(ids)), reference)
    if problem:
        return None, problem
    unclipped = getattr(u, "unclipped", None)
    if unclipped is not None:
        if type(unclipped) not in (int, float) or not 0 <= unclipped <= len(ids):
            return None, f"unclipped = {describe(unclipped)}, expected a number from 0 to {len(ids)}"
        unclipped = float(unclipped)
    return Summed(list(ids), checked.arrays, unclipped, {}), None


def summed_metrics(metrics, ids: list[int]) -> dict[int, tuple[dict, list[str]]]:
    """Each client's clean metrics of a secure sum (what it reported in the clear), with the reasons
    for what was dropped."""
    if not isinstance(metrics, dict):
        return {c: ({}, [f"the sum's metrics are a {type(metrics).__name__}, not a table"]) for c in ids}
    out = {}
    for c in ids:
        try:
            out[c] = clean_metrics(dict.get(metrics, c, {}))
        except Exception as e:  # a key of the sum's table that cannot be compared with an int
            out[c] = ({}, [f"metrics could not be read ({type(e).__name__})"])
    return out


# ---------------------------------------------------------------- metrics

def clean_metrics(metrics) -> tuple[dict, list[str]]:
    """(the entries of a client's metrics that pass the policy of the module docstring, a reason for
    each entry dropped). Never raises; at most ``MAX_METRICS`` entries are looked at beyond one."""
    if not isinstance(metrics, dict):
        return {}, [] if metrics is None else [f"metrics are a {type(metrics).__name__}, not a table"]
    out: dict = {}
    reasons: list[str] = []
    try:
        size = dict.__len__(metrics)
        for key, value in itertools.islice(dict.items(metrics), MAX_METRICS):
            key, problem = _metric_key(key)
            if problem is None:
                value, problem = _metric_value(key, value)
            if problem:
                reasons.append(problem)
            else:
                out[key] = value
        if size > MAX_METRICS:
            reasons.append(f"{size - MAX_METRICS} entries beyond the first {MAX_METRICS} dropped")
    except Exception as e:  # a dict subclass, or one changed while read: what was read so far stays
        reasons.append(f"metrics could not be read in full ({type(e).__name__})")
    return out, reasons


def _metric_key(key) -> tuple[str | None, str | None]:
    if not isinstance(key, str):
        return None, f"metric key {describe(key)} is not text"
    key = str.__str__(key)  # a str subclass's own methods are never called again
    if not KEY.fullmatch(key):
        return None, f"metric key {describe(key)} is not a plain name (letters, digits, _ . - / :, at most 64)"
    return key, None


def _metric_value(key: str, v):
    try:
        import numpy as np

        if isinstance(v, np.generic):  # a numpy scalar from an in-process client: its Python value
            v = v.item()
    except ImportError:  # pragma: no cover - numpy comes with torch
        pass
    if isinstance(v, bool):
        if key in NUMERIC:
            return None, f"metric {key!r} = {v} is a bool, expected a number"
        return bool(v), None
    if isinstance(v, int):
        if int.bit_length(v) > 64 or abs(int.__int__(v)) > MAX_ABS:
            return None, f"metric {key!r} = {describe(v)} is beyond ±{MAX_ABS:g}"
        return int.__int__(v), None
    if isinstance(v, float):
        x = float.__float__(v)
        if not math.isfinite(x) or abs(x) > MAX_ABS:
            return None, f"metric {key!r} = {x!r:.30} is not a finite number within ±{MAX_ABS:g}"
        return x, None
    if isinstance(v, str):
        if key in NUMERIC:
            return None, f"metric {key!r} = {describe(v)} is text, expected a number"
        s = str.__str__(v)
        if len(s) > MAX_TEXT or not s.isprintable():
            return None, f"metric {key!r}: text of {len(s)} characters, expected at most {MAX_TEXT} printable ones"
        return s, None
    return None, f"metric {key!r} is a {type(v).__name__}, not a number or short text"


def summary(reasons: list[str]) -> list[str]:
    """What a client line in metrics.jsonl keeps of the reasons: the first few, then a count."""
    if len(reasons) <= MAX_REASONS:
        return list(reasons)
    return reasons[:MAX_REASONS] + [f"and {len(reasons) - MAX_REASONS} more"]


def flower_metrics(record) -> tuple[dict, str | None]:
    """A Flower reply's ``metrics`` record (a MetricRecord, or whatever a client put there) as clean
    metrics, and one line saying what was dropped (None: nothing). Never raises: the Flower runtime
    calls it where it reads a reply, so an Update never carries more than the policy allows."""
    if record is None:
        return {}, None
    try:
        if isinstance(record, dict):
            metrics, reasons = clean_metrics(record)
        else:  # MetricRecord is a mapping, not a dict: at most MAX_METRICS entries are read
            size = len(record)
            metrics, reasons = clean_metrics(dict(itertools.islice(record.items(), MAX_METRICS)))
            if size > MAX_METRICS:
                reasons.append(f"{size - MAX_METRICS} entries beyond the first {MAX_METRICS} dropped")
    except Exception as e:
        return {}, f"the metrics record could not be read ({type(e).__name__})"
    return metrics, "; ".join(summary(reasons)) if reasons else None


# ---------------------------------------------------------------- the run's log

MAX_LINE = 1 << 20  # characters of one metrics.jsonl line written as it is; a longer one is written bounded
MAX_DEPTH = 8
MAX_ITEMS = 1000
MAX_STRING = 10_000


def jsonable(x, depth: int = 0):
    """A JSON-safe copy of ``x`` within bounds: text keys, lists for tuples, containers cut to
    ``MAX_ITEMS`` entries and ``MAX_DEPTH`` levels (a container that holds itself ends there),
    strings to ``MAX_STRING`` characters, and anything else (bytes, huge ints, objects) by its
    description. For a metrics.jsonl line that json.dumps could not write as it is."""
    if x is None or isinstance(x, bool):
        return x
    if type(x) is int:
        return x if int.bit_length(x) <= 64 else describe(x)
    if type(x) is float:
        return x
    if type(x) is str:
        return x if len(x) <= MAX_STRING else x[:MAX_STRING] + f"... ({len(x)} characters)"
    if depth >= MAX_DEPTH:
        return describe(x)
    if type(x) is dict:
        out = {}
        for k, v in itertools.islice(x.items(), MAX_ITEMS):
            key = k if type(k) is str and len(k) <= 200 else describe(k, 200)
            out[key] = jsonable(v, depth + 1)
        if len(x) > MAX_ITEMS:
            out["..."] = f"{len(x) - MAX_ITEMS} more entries"
        return out
    if type(x) in (list, tuple):
        out = [jsonable(v, depth + 1) for v in x[:MAX_ITEMS]]
        return out + [f"... {len(x) - MAX_ITEMS} more"] if len(x) > MAX_ITEMS else out
    return describe(x, 200)
