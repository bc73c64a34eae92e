"""Flower (flwr 1.41) as the transport: a ServerApp and a ClientApp around fedit's own code.

This is the only module that imports flwr. It converts fedit's protocol types
(fedit.protocol: FitIns down, Update up) to and from Flower records and calls
the same code as the in-process run:

- the ServerApp calls ``fedit.server.run`` (the one round loop) with a
  ``FlowerRuntime`` whose ``fit`` sends one ``train`` message per FitIns
  through the Grid and yields an ``Update`` per reply and a ``Failure`` per
  client that errored, vanished, did not answer in time or sent a malformed
  reply;
- the ClientApp calls ``fedit.client.train`` with ``client.seed_for(seed,
  round, client_id)`` and the strategy's client algorithm, so a deployment
  trains exactly what the simulation does.

Records of a train message: ``config`` (transport: round, the fedit config),
``fitins`` (the strategy's scalars for this client) and one ArrayRecord per
array group (``arrays.global``, ``arrays.control``, ...). Of a reply: ``reply``
(what the server relies on: client id, example count), ``metrics`` (the
client's free-form metrics, never read as anything else) and one ArrayRecord
per array group. A client algorithm's state (SCAFFOLD's control variate) stays
on the SuperNode in ``context.state``, one version per round it was made in;
the client reads the version of the round its FitIns names (the last round the
server accepted its update).

Which SuperNode is which client: each SuperNode is started with
``--node-config 'client-id=3 data-path="/data/client_003.jsonl"'``. The server
learns the mapping with one cheap ``query`` message per newly seen node (the
ClientApp answers with its ``client-id`` without loading a model); every train
reply repeats the client id and the server checks it. Under Flower's simulation
runtime, where node config holds only ``partition-id``, the partition id is the
client id and the data file comes from ``data.clients_dir``.

Failures: a reply carrying a Flower error (the ClientApp raised, crashed, or
the SuperLink declared the node unavailable after missed heartbeats, about
60 s), a selected client with no connected node, and no reply within
``federation.round_timeout`` seconds each become ``Failure(client_id,
reason)``; the round loop logs them and aggregates the replies that came.

Cost: the Deployment Runtime runs every message in a fresh ``flwr-clientapp``
process (flwr 1.41 and 1.42). A SuperNode started by `fedit site` has a worker
(node config ``worker``: fedit/site.py) that keeps the base model loaded and the
client state on the site's disk; the ClientApp hands it the message's arrays over
a local socket and relays the answer, without importing torch. A plain SuperNode
does the work in the ClientApp process itself (fedit.site.SiteWork), loading the
model per message (about 3 s for SmolLM2-135M on 2 idle CPU cores), with the
client state in Flower's node context. Each train reply reports the time before
training as ``load_seconds``. The model cache of fedit/site.py also keeps the
model where the process does survive (Flower's Ray simulation runtime, one model
per actor; the adapter is set per message, so no client state lives in it).

Which client a SuperNode is: from its node config (``client-id``), or, for
sites whose keys `fedit server` registered, from the node id its key was given
(run config ``bindings``), so a node cannot claim another site's id.
"""

from __future__ import annotations

import logging
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedit import config as config_mod
from fedit.config import Config
from fedit.errors import FeditError
from fedit.runtime.flower_secagg import dp_clip, is_secure, secagg_if_configured, secure_reply, secure_sum

log = logging.getLogger("fedit.flower")

# Keys of [tool.flwr.app.config] (the Flower run config) that the ServerApp reads.
RUN_CONFIG = {
    "fedit-config": "",  # the fedit config as TOML text (what `fedit run` reads from --config + overrides)
    "resume": "",  # a run directory on the server machine to continue
    "min-nodes": 0,  # wait for this many SuperNodes before round 1; 0: every client of the manifest
    "node-wait": 600.0,  # seconds to wait for them
    "bindings": "",  # `fedit server`: JSON {node id: client id} of the registered site keys
}


# ---------------------------------------------------------------- records <-> fedit objects

def config_to_text(cfg: Config) -> str:
    return config_mod.to_toml(cfg)


def config_from_text(text: str, source: str) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FeditError(f"{source} is not valid TOML: {e}") from None
    return config_mod.from_dict(raw, source)


def adapter_to_record(adapter) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in adapter.items()})


def record_to_adapter(record: ArrayRecord):
    return dict(record.to_torch_state_dict())


# ---------------------------------------------------------------- client side

client_app = ClientApp()

def _node_identity(context: Context, cfg: Config | None, wanted: int | None = None) -> tuple[int, Path | None]:
    """(client id, data file) of this SuperNode: the client id from its node config, or, for a site started
    with `fedit site` (node config ``site``: it is known to the server by its authentication key), the id the
    server's message names."""
    nc = context.node_config
    if "client-id" in nc:
        cid = nc["client-id"]
    elif "partition-id" in nc:  # Flower's simulation runtime: virtual node i is client i
        cid = nc["partition-id"]
    elif "site" in nc and wanted is not None:
        cid = wanted
    elif "site" in nc:
        raise FeditError(f"site {nc['site']} is known to the server by its key: start the run with `fedit server`")
    else:
        raise FeditError("this SuperNode has no client-id in its node config; start it with `fedit site`, or "
                         "with --node-config 'client-id=N data-path=\"/path/to/client_N.jsonl\"'")
    if isinstance(cid, bool) or not isinstance(cid, int):
        raise FeditError(f"node config client-id = {cid!r}: expected a whole number")
    if "data-path" in nc:
        return cid, Path(str(nc["data-path"])).expanduser()
    if cfg is not None and cfg.data.clients_dir:
        from fedit.data.partition import read_manifest

        files = {c["id"]: c["file"] for c in read_manifest(cfg.data.clients_dir)["clients"]}
        if cid not in files:
            raise FeditError(f"client-id {cid} is not in the partition {cfg.data.clients_dir}")
        return cid, Path(cfg.data.clients_dir) / files[cid]
    return cid, None


@client_app.query()
def _query(msg: Message, context: Context) -> Message:
    """Who am I: answers with this node's client id, without loading a model (about a process start)."""
    cid, path = _node_identity(context, None)
    return Message(RecordDict({"node": ConfigRecord({"client-id": cid, "data-path": str(path or "")})}), reply_to=msg)


ARRAYS = "arrays."  # record-name prefix of an array group
STATE = "fedit-state-"  # context.state key prefix of a client algorithm's state, + the round it was made in


class ContextState:
    """A client algorithm's state in Flower's node context (a plain SuperNode's memory: lost when it stops)."""

    def __init__(self, context: Context):
        self.state = context.state

    def load(self, client_id: int, round_num: int):
        if STATE + str(round_num) not in self.state:
            raise FeditError(f"client {client_id} has no state from round {round_num} (the server accepted its update "
                             f"then); was this SuperNode restarted? Its algorithm state lives in the SuperNode "
                             f"process (`fedit site` keeps it on the site's disk)")
        return record_to_adapter(self.state[STATE + str(round_num)])

    def save(self, client_id: int, round_num: int, state, keep: int) -> None:
        self.state[STATE + str(round_num)] = adapter_to_record(state)
        for key in [k for k in self.state.keys() if k.startswith(STATE)]:
            if key not in (STATE + str(round_num), STATE + str(keep)):
                del self.state[key]


def fitins_to_content(ins, cfg_text: str) -> RecordDict:
    records = {"config": ConfigRecord({"round": ins.round, "client-id": ins.client_id, "fedit-config": cfg_text}),
               "fitins": ConfigRecord(dict(ins.config))}
    records.update({ARRAYS + g: adapter_to_record(a) for g, a in ins.arrays.items()})
    return RecordDict(records)


def _array_groups(content: RecordDict) -> dict:
    return {name[len(ARRAYS):]: record_to_adapter(rec) for name, rec in content.items() if name.startswith(ARRAYS)}


def content_to_fitins(content: RecordDict):
    from fedit.protocol import FitIns

    conf = content["config"]
    return FitIns(int(conf["round"]), int(conf["client-id"]), _array_groups(content), dict(content["fitins"]))


def _message_setup(msg: Message, context: Context) -> tuple[Config, int, Path]:
    """The config a message carries and this node's client id and data file, checked against the message."""
    cfg = config_from_text(str(msg.content["config"]["fedit-config"]), "the fedit config sent by the server")
    wanted = int(msg.content["config"]["client-id"])
    cid, path = _node_identity(context, cfg, wanted)
    if cid != wanted:
        raise FeditError(f"this SuperNode is client {cid}, but the message is for client {wanted}")
    if path is None:
        raise FeditError("this SuperNode has no data-path in its node config and the server's data.clients_dir is "
                         "not set; start it with `fedit site --data FILE`, or with --node-config 'client-id=N "
                         "data-path=\"/path/to/client_N.jsonl\"'")
    return cfg, cid, path


def _worker(context: Context, kind: str, msg: Message) -> dict | None:
    """The site worker's answer to this message (`fedit site`: the model stays loaded there), or None where the
    SuperNode has no worker and this process does the work itself."""
    from fedit import site

    nc = context.node_config
    if "worker" not in nc:
        return None
    conf = msg.content["config"]
    arrays = {name[len(ARRAYS):]: {k: a.numpy() for k, a in rec.items()} for name, rec in msg.content.items()
              if name.startswith(ARRAYS)}
    answer = site.call(str(nc["worker"]), Path(str(nc["worker-key"])).read_bytes(), {
        "kind": kind, "config": str(conf["fedit-config"]), "round": int(conf["round"]),
        "client_id": int(conf["client-id"]), "fitins": dict(msg.content["fitins"]) if "fitins" in msg.content else {},
        "arrays": arrays})
    if "error" in answer:
        raise FeditError(answer["error"])
    return answer


def _local_work(context: Context, path: Path):
    from fedit.site import SiteWork

    model = context.node_config.get("model")
    return SiteWork(path, ContextState(context), str(model) if model else None)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation: score the global adapter on this site's validation split; reply with its loss
    sums and counts per category (fedit.protocol.Evaluation) and nothing else."""
    t0 = time.perf_counter()  # the message's arrival in this process: load_seconds counts from here
    from fedit.protocol import EvalIns

    cfg, cid, path = _message_setup(msg, context)
    answer = _worker(context, "evaluate", msg)
    if answer is not None:
        by_category, examples = answer["evaluation"]["by_category"], answer["evaluation"]["examples"]
    else:
        e, _ = _local_work(context, path).evaluate(cfg, EvalIns(int(msg.content["config"]["round"]), cid,
                                                               _array_groups(msg.content)), t0)
        by_category, examples = e.by_category, e.examples
    cats = sorted(by_category)
    return Message(RecordDict({"evaluation": ConfigRecord({
        "client-id": cid, "examples": examples, "categories": cats,
        "loss-sums": [float(by_category[c][0]) for c in cats], "tokens": [by_category[c][1] for c in cats],
        "counts": [by_category[c][2] for c in cats]})}), reply_to=msg)


def reply_to_evaluation(content: RecordDict, cid: int):
    """The Evaluation in an evaluate reply, or the reason it is malformed (a string); its values are checked
    by the round loop (fedit.evaluation.federated.check)."""
    from fedit.protocol import Evaluation

    try:
        r = content["evaluation"]
        sender, examples = r["client-id"], r["examples"]
        cats, sums, tokens, counts = (list(r[k]) for k in ("categories", "loss-sums", "tokens", "counts"))
        if not len(cats) == len(sums) == len(tokens) == len(counts) or len(set(map(str, cats))) != len(cats):
            return "malformed evaluation: its category lists differ in length or repeat a category"
        by_category = {c: [s, n, x] for c, s, n, x in zip(cats, sums, tokens, counts)}
    except Exception as e:  # untrusted input: a rejected reply, never a crashed server
        return f"malformed evaluation: {type(e).__name__}: {str(e)[:200]}"
    if sender != cid:
        return f"the evaluation came from a node that is no longer client {cid}"
    return Evaluation(cid, by_category, examples)


@client_app.train(mods=[secagg_if_configured])
def _train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()  # the message's arrival in this process: load_seconds counts from here
    cfg, cid, path = _message_setup(msg, context)
    secure = is_secure(msg.content)
    if context.node_config.get("secure-aggregation", False) is True and not secure:
        raise FeditError(f"client {cid} sends its change only through secure aggregation (node config "
                         f"secure-aggregation=true) and this round asked for it in the clear: refused")
    answer = _worker(context, "train", msg)
    if answer is not None:  # the worker trained: relay its arrays as they are (no torch in this process)
        metrics, num = answer["metrics"], answer["num_examples"]
        groups = {g: ArrayRecord({k: Array(v) for k, v in arrays.items()}) for g, arrays in answer["arrays"].items()}
    else:
        update, _ = _local_work(context, path).train(cfg, content_to_fitins(msg.content), t0)
        metrics, num = update.metrics, update.num_examples
        groups = {g: adapter_to_record(a) for g, a in update.arrays.items()}
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if secure:  # in the clear beside the masked change: who, how long, how many values the range clipped
        from fedit.protocol import Update

        update = Update(cid, {g: record_to_adapter(rec) for g, rec in groups.items()}, num, metrics)
        arrays, clipped = secure_change(content_to_fitins(msg.content), update, msg.content["secure"])
        plain = {"seconds": metrics.get("seconds", 0.0), "load_seconds": metrics.get("load_seconds", 0.0),
                 "secagg_clipped_values": clipped}
        return Message(secure_reply(arrays, {CLIENT_ID: cid, **{METRIC + k: v for k, v in plain.items()}}),
                       reply_to=msg)
    records = {"reply": ConfigRecord({"client-id": cid, "num-examples": num}), "metrics": MetricRecord(metrics)}
    records.update({ARRAYS + g: rec for g, rec in groups.items()})
    return Message(RecordDict(records), reply_to=msg)


# Fields of a secure reply's plaintext metrics (Flower's FitRes has one flat dict for them).
CLIENT_ID, METRIC = "fedit.client-id", "metric."


def secure_change(ins, update, secure: ConfigRecord) -> tuple[list, int]:
    """What a client sends in a secure round: Δ = θ_k − θ per tensor (sorted by name, float64), and
    under client-level DP, Δ clipped here plus one value holding C·[not clipped]; with the number
    of values beyond the clipping range (Flower clips them before quantising).

    Under DP the clip is to C·(1 − 2√d/Q), not C: quantisation moves each of the d values by less
    than one step 2C/Q, so what enters the sum has norm at most C, the sensitivity the accountant
    assumes."""
    import numpy as np
    import torch

    from fedit.aggregators import clip_norm
    from fedit.protocol import CLIP

    glob = ins.global_adapter
    keys = sorted(glob)
    delta = {k: update.adapter[k].to(torch.float64) - glob[k].to(torch.float64) for k in keys}
    extra = []
    bound = float(ins.config.get(CLIP, 0.0))
    if bound:
        d = sum(v.numel() for v in delta.values())
        inner = dp_clip(bound, d, int(secure["quantization-range"]))
        if inner is None:
            raise FeditError(f"secagg.quantization_range = {secure['quantization-range']} is too coarse for "
                             f"{d} values under DP; raise it (and secagg.modulus_range)")
        delta, norm = clip_norm(delta, inner)
        extra = [np.array([bound if norm <= inner else 0.0])]
    arrays = [delta[k].numpy() for k in keys] + extra
    c = float(secure["clipping-range"])
    return arrays, sum(int((np.abs(a) > c).sum()) for a in arrays)


def reply_to_update(content: RecordDict, cid: int):
    """The Update in a train reply, or the reason it is malformed (a string)."""
    from fedit.protocol import Update

    from fedit.boundary import flower_metrics

    try:
        reply = content["reply"]
        metrics, dropped = flower_metrics(content["metrics"] if "metrics" in content else None)
        arrays = _array_groups(content)
        sender, num = reply["client-id"], reply["num-examples"]
    except Exception as e:  # untrusted input: whatever it is, it is a rejected reply, not a crashed server
        return f"malformed reply: {type(e).__name__}: {str(e)[:200]}"
    if sender != cid:
        return f"the reply came from a node that is no longer client {cid}"
    if dropped:
        log.warning("client %s: %s", cid, dropped)
    return Update(client_id=cid, arrays=arrays, num_examples=num, metrics=metrics)


# ---------------------------------------------------------------- server side

def _error_text(reply: Message) -> str:
    e = reply.error
    names = {1: "the ClientApp could not be loaded", 2: "the ClientApp raised", 3: "message unavailable",
             4: "reply unavailable", 5: "SuperNode unavailable", 7: "invalid app bundle", 8: "the ClientApp crashed"}
    return f"{names.get(e.code, f'Flower error {e.code}')}: {(e.reason or '').strip()[-500:]}"


@dataclass
class Nodes:
    """Which connected SuperNode is which fedit client: learnt with one query message per new node, or, where
    `fedit server` registered each site's authentication key, bound to the node id that key was given
    (``bindings``): a node then cannot claim another site's client id, whatever its node config says."""

    grid: Grid
    node_wait: float = 30.0
    by_client: dict[int, int] = field(default_factory=dict)  # client id -> node id
    known: dict[int, int | None] = field(default_factory=dict)  # node id -> client id (None: unusable)
    bindings: dict[int, int] | None = None  # node id -> client id, from the registered keys

    def refresh(self, wait: float | None = None) -> None:
        """Drop nodes that left; ask the new ones who they are."""
        connected = set(self.grid.get_node_ids())
        if self.bindings is not None:
            for node in sorted(connected - set(self.known)):
                self.known[node] = self.bindings.get(node)
                if self.known[node] is None:
                    log.warning("SuperNode %s has no registered site key: it takes no part", node)
                else:
                    log.info("SuperNode %s is client %s (by its key)", node, self.known[node])
            self.by_client = {c: n for n, c in self.bindings.items() if n in connected}
            self.known = {n: c for n, c in self.known.items() if n in connected}
            return
        for node in list(self.known):
            if node not in connected:
                cid = self.known.pop(node)
                if cid is not None and self.by_client.get(cid) == node:
                    del self.by_client[cid]
        new = sorted(connected - set(self.known))
        if not new:
            return
        ids = list(self.grid.push_messages([Message(RecordDict(), dst_node_id=n, message_type="query",
                                                    group_id="query") for n in new]))
        pending = dict(zip(ids, new))
        deadline = time.monotonic() + (self.node_wait if wait is None else wait)
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                if reply.has_error():
                    log.warning("SuperNode %s cannot take part: %s", node, _error_text(reply))
                    self.known[node] = None
                    continue
                try:  # untrusted: a malformed answer makes the node unusable, never the server crash
                    cid = reply.content["node"]["client-id"]
                except Exception as e:
                    cid = f"{type(e).__name__}: {str(e)[:100]}"
                if isinstance(cid, bool) or not isinstance(cid, int):
                    log.warning("SuperNode %s cannot take part: its client-id is %r, not a whole number", node, cid)
                    self.known[node] = None
                    continue
                old = self.by_client.get(cid)
                if old is not None and old != node:
                    log.warning("SuperNodes %s and %s both say client-id = %s; using the newer %s", old, node, cid, node)
                    self.known[old] = None
                self.by_client[cid], self.known[node] = node, cid
                log.info("SuperNode %s is client %s", node, cid)
            if pending:
                time.sleep(0.5)
        # A node that did not answer is asked again at the next refresh.

    def wait_for(self, expected: set[int] | None, count: int, timeout: float) -> None:
        """Until every expected client id (or ``count`` clients) is connected, or ``timeout`` s passed."""
        deadline = time.monotonic() + timeout
        while True:
            self.refresh(wait=max(1.0, min(self.node_wait, deadline - time.monotonic())))
            have = set(self.by_client)
            if (expected is not None and expected <= have) or (expected is None and len(have) >= count):
                return
            if time.monotonic() >= deadline:
                want = f"clients {sorted(expected - have)}" if expected is not None else f"{count} SuperNodes"
                log.warning("after %.0f s still missing %s; starting with clients %s", timeout, want, sorted(have))
                return
            time.sleep(1.0)


class FlowerRuntime:
    """The round loop's Runtime over a Flower Grid: one train message per selected client and round."""

    def __init__(self, grid: Grid, cfg: Config, nodes: Nodes, poll: float = 0.5):
        self.grid, self.cfg, self.nodes, self.poll = grid, cfg, nodes, poll
        self.cfg_text = config_to_text(cfg)
        self.secure = cfg.secagg.enabled  # the round's changes arrive as one Summed

    def _nodes_of(self, instructions: list) -> tuple[dict, list]:
        """(node id -> the instruction of the client it serves, a Failure per client with no connected node)."""
        from fedit.protocol import Failure

        self.nodes.refresh(wait=min(self.nodes.node_wait, 30.0))  # a SuperNode that (re)joined since last round
        by_node, missing = {}, []
        for ins in instructions:
            node = self.nodes.by_client.get(ins.client_id)
            if node is None:
                missing.append(Failure(ins.client_id, f"no connected SuperNode has client-id = {ins.client_id}"))
            else:
                by_node[node] = ins
        return by_node, missing

    def _exchange(self, round_num: int, by_node: dict, kind: str, decode) -> Iterator:
        """One ``kind`` message per node; yields decode(reply content, client id) per reply, or a Failure
        (a Flower error, a malformed reply, no reply within federation.round_timeout)."""
        from fedit.protocol import Failure

        timeout = self.cfg.federation.round_timeout
        messages = [Message(fitins_to_content(ins, self.cfg_text), dst_node_id=node, message_type=kind,
                            group_id=f"{kind}-{round_num}", ttl=timeout if timeout > 0 else None)
                    for node, ins in by_node.items()]
        targets = [ins.client_id for ins in by_node.values()]
        pending = dict(zip(self.grid.push_messages(messages), targets))
        deadline = time.monotonic() + timeout if timeout > 0 else None
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                cid = pending.pop(reply.metadata.reply_to_message_id, None)
                if cid is None:
                    continue
                if reply.has_error():
                    yield Failure(cid, _error_text(reply))
                    continue
                result = decode(reply.content, cid)
                yield Failure(cid, result) if isinstance(result, str) else result
            if pending and deadline is not None and time.monotonic() >= deadline:
                for cid in pending.values():
                    yield Failure(cid, f"no reply within federation.round_timeout = {timeout:g} s")
                return
            if pending:
                time.sleep(self.poll)

    def available(self, round_num: int, wanted: int) -> list[int]:
        """The clients whose SuperNode is connected now; waits up to federation.round_timeout for ``wanted`` of
        them, so a round never stalls on a site that is gone, and a site that (re)joined is picked again."""
        # round_timeout 0 waits without end for the selected sites; for the draw, at most one heartbeat (30 s)
        timeout = self.cfg.federation.round_timeout or min(self.nodes.node_wait, 30.0)
        deadline = time.monotonic() + timeout
        while True:
            self.nodes.refresh(wait=min(self.nodes.node_wait, 30.0))
            if len(self.nodes.by_client) >= wanted or time.monotonic() >= deadline:
                return sorted(self.nodes.by_client)
            time.sleep(1.0)

    def fit(self, round_num: int, instructions: list) -> Iterator:
        by_node, missing = self._nodes_of(instructions)
        yield from missing
        if not by_node:
            return
        if self.secure:
            yield from self._secure_fit(round_num, by_node)
            return
        yield from self._exchange(round_num, by_node, "train", reply_to_update)

    def evaluate(self, round_num: int, instructions: list) -> Iterator:
        """Federated evaluation: one ``evaluate`` message per client, answered by the same ClientApp (always in
        the clear, also under secure aggregation: docs/federated-evaluation.md)."""
        by_node, missing = self._nodes_of(instructions)
        yield from missing
        if by_node:
            yield from self._exchange(round_num, by_node, "evaluate", reply_to_evaluation)


    def _secure_fit(self, round_num: int, by_node: dict) -> Iterator:
        """One SecAgg+ round (fedit/runtime/flower_secagg.py) over the nodes of ``by_node``: a Failure per
        client that is not in the sum, then one Summed of the others' changes, if the sum passes its checks."""
        from fedit.boundary import flower_metrics
        from fedit.protocol import ADAPTER, CLIP, Failure, Summed

        sc = self.cfg.secagg
        first = next(iter(by_node.values()))
        values = sum(v.numel() for v in first.global_adapter.values())
        bound = float(first.config.get(CLIP, 0.0))
        c = bound or sc.clipping_range  # under DP every value of a clipped change is within ±C
        n = len(by_node)
        problem, result, total, unclipped = None, None, None, None
        if n < 3:
            problem = ("secure aggregation needs at least three clients in a round (Flower's masks come from "
                       "32-bit seeds: fewer would let the server search them); these changes are not used")
        elif n * sc.quantization_range >= sc.modulus_range:
            problem = f"secure aggregation of {n} clients needs secagg.modulus_range > {n * sc.quantization_range}"
        elif bound and dp_clip(bound, values, sc.quantization_range) is None:
            problem = f"secagg.quantization_range = {sc.quantization_range} is too coarse for {values} values under DP"
        else:
            contents = {}
            for node, ins in by_node.items():
                contents[node] = fitins_to_content(ins, self.cfg_text)
                contents[node]["secure"] = ConfigRecord({"clipping-range": c,
                                                         "quantization-range": sc.quantization_range})
            try:  # round_timeout applies to each of SecAgg+'s four stages
                result = secure_sum(self.grid, round_num, contents, sc, c, self.cfg.federation.round_timeout or None)
            except Exception as e:  # e.g. a masked vector of another shape: Flower's unmasking cannot add it
                problem = f"secure aggregation failed: {type(e).__name__}: {str(e)[:200]}"
            else:
                if not result.contributors:
                    problem = "secure aggregation halted: too few clients stayed in the round to unmask the sum"
                else:
                    total, unclipped, problem = check_sum(result.total, first.global_adapter, len(result.contributors),
                                                          c, bound, sc.quantization_range)
        if problem:
            log.warning("round %d: %s", round_num, problem)
            for ins in by_node.values():
                yield Failure(ins.client_id, problem)
            return
        for node, ins in by_node.items():
            if node not in result.contributors:
                yield Failure(ins.client_id, result.errors.get(node, "its change is not in the sum"))
        clients, metrics = [], {}
        for node in result.contributors:
            cid, reported = by_node[node].client_id, result.metrics.get(node, {})
            if reported.get(CLIENT_ID) != cid:  # the sum is what it is; the mismatch is for the operator to see
                log.warning("round %d: SuperNode %s (client %s) reported client-id %r", round_num, node, cid,
                            reported.get(CLIENT_ID))
            clients.append(cid)
            metrics[cid], dropped = flower_metrics({k[len(METRIC):]: v for k, v in reported.items()
                                                    if isinstance(k, str) and k.startswith(METRIC)})
            if dropped:
                log.warning("round %d: client %s: %s", round_num, cid, dropped)
        yield Summed(clients, {ADAPTER: total}, unclipped, metrics)


def check_sum(arrays: list, reference: dict, clients: int, c: float, bound: float, q: int):
    """(Σ Δ_k by tensor name, Σ not-clipped bits or None, None) from an unmasked sum, or (None, None, why not).

    What a sum can be checked for: its arrays (the adapter's, in name order, then under DP the bits'
    value C·Σ b_k), and the bounds every honest sum keeps. Each value: Flower clips every value of a
    change to ±c before masking, so |Σ| ≤ n·c per value. Under client-level DP also the L2 norm: each
    honest change is clipped on its client to norm C (= c), so ‖Σ Δ_k‖ ≤ n·C; a client that skips its
    clip could otherwise add up to C·√d. What still passes: a sum within those bounds, so one dishonest
    client can move the round's sum by up to 2·n·C in norm (n·c per value without DP), and a false
    clipped-or-not bit (either value is possible for an honest client). See docs/boundary.md."""
    import math

    import numpy as np
    import torch

    keys = sorted(reference)
    total = [torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in arrays]
    unclipped = None
    if bound and total and total[-1].numel() == 1:
        # rounded half up, never to even: a tampered value at k + 0.5 must not let an honest bit count 0 or 2
        unclipped = float(math.floor(float(total.pop()[0]) / bound + 0.5))
    if [tuple(t.shape) for t in total] != [tuple(reference[k].shape) for k in keys]:
        return None, None, "the unmasked sum has other arrays than the adapter's"
    largest = max((float(t.abs().max()) for t in total if t.numel()), default=0.0)
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in total))
    if largest > clients * c * (1 + 2 / q) + 1e-9 or (bound and (unclipped is None or not 0 <= unclipped <= clients)):
        return None, None, (f"the unmasked sum is out of range (a value of {largest:.3g} from {clients} clients "
                            f"clipped to ±{c:g}): a client tampered with its masked vector; the round's changes "
                            f"are not used")
    if bound and norm > clients * bound * (1 + 1e-9) + 1e-9:
        return None, None, (f"the unmasked sum has norm {norm:.4g}, more than {clients} clients each clipped to "
                            f"{bound:g} can make: a client skipped its clip; the round's changes are not used")
    return dict(zip(keys, total)), unclipped, None


server_app = ServerApp()


def _run_config(context: Context) -> dict:
    return {k: context.run_config.get(k, v) for k, v in RUN_CONFIG.items()}


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    fedit_log = logging.getLogger("fedit")
    if not fedit_log.handlers:  # fedit's lines (rounds, drops) into the run's log, without Flower's HTTP chatter
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        fedit_log.addHandler(handler)
        fedit_log.setLevel(logging.INFO)
        fedit_log.propagate = False
    rc = _run_config(context)
    try:
        serve(grid, rc)
    except FeditError as e:
        log.error("%s", e)
        raise


def serve(grid: Grid, rc: dict) -> Path:
    """The server side of a deployment: prepare like `fedit run`, then the same round loop."""
    import json

    from fedit import server
    from fedit.runner import run_metadata

    from fedit.runner import figures_line, resolve_run

    resume = str(rc["resume"] or "")
    if not resume and not rc["fedit-config"]:
        raise FeditError("the Flower run config has no fedit-config; launch with `fedit flower run`")
    cfg = None if resume else config_from_text(str(rc["fedit-config"]), "the fedit config of this Flower run")
    cfg, run_dir = resolve_run(cfg, resume or None)
    run_dir = run_dir.resolve()
    if cfg.attack.kind != "none":
        raise FeditError("[attack] simulates malicious clients in `fedit run` only; on Flower the clients are real: "
                         "remove the [attack] table")
    prep = prepare_server(cfg)

    bindings = {int(n): int(c) for n, c in json.loads(str(rc["bindings"] or "{}")).items()} or None
    nodes = Nodes(grid, node_wait=float(rc["node-wait"]), bindings=bindings)
    saved = json.loads((run_dir / "run.json").read_text()).get("flower", {}) if resume and (run_dir / "run.json").exists() else {}
    if saved.get("client_ids"):
        client_ids = list(saved["client_ids"])
    elif bindings:  # `fedit server`: every site whose key it registered
        client_ids = sorted(set(bindings.values()))
    elif prep["manifest_ids"]:
        client_ids = prep["manifest_ids"]
    else:
        client_ids = None
    min_nodes = int(rc["min-nodes"])
    k = cfg.federation.clients_per_round
    nodes.wait_for(set(client_ids) if client_ids and not min_nodes else None,
                   min_nodes or (len(client_ids) if client_ids else k), float(rc["node-wait"]))
    if client_ids is None:
        client_ids = sorted(nodes.by_client)
    if not client_ids:
        raise FeditError(f"no SuperNode with a client-id connected within {rc['node-wait']} s; start SuperNodes "
                         f"with --node-config 'client-id=N data-path=\"...\"' pointed at this SuperLink")
    log.info("clients: %s; connected now: %s", client_ids, sorted(nodes.by_client))
    from fedit.aggregators import round_size, tolerance  # raises where a robust aggregator would tolerate no one

    log.info("%s", tolerance(cfg, round_size(cfg.federation, len(client_ids))))
    loaded = prep["loaded"]
    meta = {**run_metadata(cfg, loaded), "runtime": "flower",
            "flower": {"client_ids": client_ids, "round_timeout": cfg.federation.round_timeout}}

    def round_end(row: dict) -> None:
        log.info("round %d: %s, %s clients accepted %s, rejected %s", row["round"], figures_line(row),
                 row["accepted"], row["clients"], row.get("rejected", []))

    def save(adapter, path: Path) -> None:
        from fedit.adapter import save_adapter

        save_adapter(loaded.model, adapter, path)

    def evaluate(adapter):
        from fedit.evaluation.heldout import heldout_loss

        return heldout_loss(loaded, prep["test"], adapter, cfg.eval.batch_size, cfg.train.micro_batch_tokens)

    # A client may claim no more examples than its partition holds, where the server has the manifest;
    # elsewhere federation.max_examples caps every client.
    if not prep["sizes"] and not cfg.federation.max_examples and cfg.federation.aggregator == "mean":
        log.warning("no partition manifest and federation.max_examples = 0: a client's claimed example count "
                    "weights its update unchecked; set federation.max_examples or a robust federation.aggregator")
    server.run(cfg, FlowerRuntime(grid, cfg, nodes), run_dir, client_ids=client_ids, client_sizes=prep["sizes"],
               initial_adapter=loaded.initial_adapter, save_adapter=save,
               evaluate=evaluate if prep["test"] is not None else None, resume=bool(resume),
               hooks=server.Hooks(round_end=round_end), meta=meta, data_sha256=prep["data_sha256"],
               validation_sizes=prep["validation_sizes"])
    try:
        server.plot_run(server.RunDir(run_dir))
    except Exception as e:  # a plot is not worth failing a finished run for
        log.warning("could not plot the loss curve: %s", e)
    log.info("run finished: %s", run_dir)
    return run_dir


def prepare_server(cfg: Config) -> dict:
    """Base model + seeded LoRA init (round 0 equals the simulation's), the held-out set if the server holds
    one, the manifest's ids and sizes if it has the manifest.

    Unlike `fedit run` the server needs no client files, and no test file where the clients hold back
    validation splits (data.client_validation): it may hold no data at all.
    """
    from fedit.data.batches import tokenize
    from fedit.data.partition import fingerprint, read_manifest, validation_size
    from fedit.data.records import load_records
    from fedit.model import attach_lora, load_base
    from fedit.runner import server_test_file

    sizes: dict[int, int] = {}
    validation_sizes: dict[int, int] = {}
    manifest = Path(cfg.data.clients_dir) / "manifest.json" if cfg.data.clients_dir else None
    if manifest and manifest.is_file():
        for c in read_manifest(cfg.data.clients_dir)["clients"]:
            held = validation_size(c["examples"], cfg.data.client_validation)
            sizes[c["id"]], validation_sizes[c["id"]] = c["examples"] - held, held
    test_file = server_test_file(cfg, Path(cfg.data.clients_dir) if cfg.data.clients_dir else None)
    loaded = load_base(cfg.model)
    attach_lora(loaded, cfg.lora, cfg.federation.seed)
    test = None
    if test_file is not None:
        t = cfg.train
        test = tokenize(load_records(test_file).records, loaded.tokenizer, cfg.eval.cutoff_len or t.cutoff_len,
                        t.train_on_inputs, cfg.data.template)
    seen = [manifest] if manifest else []  # the clients' own files are theirs
    data_sha256 = fingerprint(seen + ([test_file] if test_file else []))
    return {"loaded": loaded, "test": test, "manifest_ids": sorted(sizes), "sizes": sizes,
            "validation_sizes": validation_sizes or None, "data_sha256": data_sha256}
