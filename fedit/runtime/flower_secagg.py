"""Secure aggregation on Flower (flwr 1.41): one SecAgg+ round inside fedit's own round loop.

Flower's SecAgg+ (Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead"; ``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` on the client) runs on
Flower's legacy fit path: the workflow asks a legacy ``Strategy`` for the round's FitIns and
hands it the unmasked aggregate. fedit keeps its Message-API round loop and drives the workflow
for exactly one round at a time:

- a stand-in strategy names the round's nodes and keeps what the workflow hands back;
- the workflow's stage-2 messages (the ones that reach the ClientApp's train function) carry
  fedit's own train content (fedit/runtime/flower.py), not a legacy FitIns;
- every client replies with weight 1 (``num_examples = 1``, ``max_weight = 1``), so the
  workflow's weighted mean is Σ x_k / n and the sum is n times it.

No cryptography here: key agreement, secret sharing, masking and quantisation are Flower's.
Quantisation is stochastic rounding of each value, clipped to [−c, c], onto [0, Q]: the sum of n
clients is off by less than n·2c/Q per value (``error_bound``).

A round halts when fewer clients than the reconstruction threshold remain at some stage (or
when fewer than three were asked): nothing is unmasked, ``secure_sum`` has no contributors. The threshold
is never below three: Flower derives every mask from a 32-bit seed, so a vector hidden by a
single unknown pairwise mask (a client with one other client left) could be found by trying
all 2^32 seeds; with two other clients left it takes 2^64.

Two things are patched around flwr 1.41's workflow: a client that left before the masked
vectors (stage 0 or 1) stays in its bookkeeping and makes the unmasking stage ask everyone for
shares that nobody holds, so the round always halted; fedit drops such clients from the
round's neighbour sets before stage 2 (they never masked anything with anyone). And the reason a
client failed is kept per client (the workflow keeps it without the client's id).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

def error_bound(clients: int, clipping_range: float, quantization_range: int) -> float:
    """The largest error per value of the unmasked sum: stochastic rounding moves each client's value
    by less than one quantisation step, 2c/Q."""
    return clients * 2 * clipping_range / quantization_range


def dp_clip(bound: float, values: int, quantization_range: int) -> float | None:
    """The L2 norm a client clips its change to under DP so that, quantised, it stays within ``bound``:
    C·(1 − 2√d/Q), since rounding moves each of d values by less than one step 2C/Q. None when that
    leaves less than half of C (Q too coarse for d)."""
    inner = bound * (1 - 2 * values ** 0.5 / quantization_range)
    return inner if inner > bound / 2 else None


# ------------------------------------------------------------------ server side

class _Round(Strategy):
    """The legacy Strategy the workflow asks: the round's nodes in, the unmasked results out."""

    def __init__(self, grid, node_ids):
        self.proxies = [GridClientProxy(n, grid, grid.run.run_id) for n in node_ids]
        self.results = None

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(p, FitIns(Parameters(tensors=[], tensor_type=""), {})) for p in self.proxies]

    def aggregate_fit(self, server_round, results, failures):
        self.results = results
        return None, {}  # nothing for the workflow to write back

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _Workflow(SecAggPlusWorkflow):
    """SecAgg+ whose stage-2 messages carry fedit's train content for each node."""

    contents: dict[int, RecordDict]

    def setup_stage(self, grid, context, state):
        ok = super().setup_stage(grid, context, state)
        state.nid_to_fitins = {nid: self.contents[nid] for nid in state.nid_to_fitins}
        return ok

    def collect_masked_vectors_stage(self, grid, context, state):
        # Clients that left at stage 0 or 1 masked nothing with anyone: out of the bookkeeping, or the
        # unmasking stage asks for their key shares, which nobody holds, and halts.
        alive = set(state.active_node_ids)
        state.sampled_node_ids = alive
        state.nid_to_neighbours = {n: nb & alive for n, nb in state.nid_to_neighbours.items() if n in alive}
        return super().collect_masked_vectors_stage(grid, context, state)


class _Recording:
    """The Grid, keeping the error of every failed reply with its node and the stage it failed in."""

    STAGES = ("key setup", "key sharing", "training and masking", "unmasking")

    def __init__(self, grid):
        self.grid, self.stage, self.errors = grid, 0, {}

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, timeout=None):
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        answered = {r.metadata.src_node_id for r in replies}
        for r in replies:
            if r.has_error():
                self.errors.setdefault(r.metadata.src_node_id, f"failed in SecAgg+ {self.STAGES[self.stage]}: "
                                                              f"{(r.error.reason or '').strip()[-300:]}")
        for m in messages:
            if m.metadata.dst_node_id not in answered:
                self.errors.setdefault(m.metadata.dst_node_id,
                                       f"no reply in SecAgg+ {self.STAGES[self.stage]} within the round timeout")
        self.stage = min(self.stage + 1, len(self.STAGES) - 1)
        return replies


def threshold_of(clients: int, num_shares: float, threshold: float) -> int:
    """The reconstruction threshold as a count, at least 3: the fraction ``threshold`` of the share
    count Flower derives from the fraction ``num_shares`` (odd; all clients when it would be 2 or less)."""
    shares = round(num_shares * clients)
    if shares < clients and shares % 2 == 0:
        shares += 1
    if shares <= 2:
        shares = clients
    return min(shares, max(3, round(threshold * shares)))


@dataclass
class SecureSum:
    total: list[np.ndarray]  # Σ over the contributors of the arrays each sent, in their order
    contributors: list[int]  # node ids whose arrays are in the sum
    metrics: dict[int, dict] = field(default_factory=dict)  # node id -> what it reported in the clear
    errors: dict[int, str] = field(default_factory=dict)  # node id -> why it is not in the sum


def secure_sum(grid, round_num: int, contents: dict[int, RecordDict], sc, clipping_range: float,
               timeout: float | None) -> SecureSum:
    """Run SecAgg+ over the nodes of ``contents`` (node id -> train content); ``sc`` is the run's
    SecAggConfig. A round that halted has no ``total`` and no contributors."""
    if len(contents) < 3:
        return SecureSum([], [])
    recording = _Recording(grid)
    threshold = threshold_of(len(contents), sc.num_shares, sc.reconstruction_threshold)
    stand_in = _Round(grid, list(contents))
    legacy = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                                   run_config={}), strategy=stand_in)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_num})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # read, and not used, by setup_stage
    workflow = _Workflow(float(sc.num_shares), threshold, max_weight=1.0, clipping_range=clipping_range,
                         quantization_range=sc.quantization_range, modulus_range=sc.modulus_range, timeout=timeout)
    workflow.contents = contents
    workflow(recording, legacy)
    if not stand_in.results:
        return SecureSum([], [], errors=recording.errors)
    mean = parameters_to_ndarrays(stand_in.results[0][1].parameters)  # every result carries the same aggregate
    n = len(stand_in.results)
    return SecureSum([m * n for m in mean], [p.node_id for p, _ in stand_in.results],
                     {p.node_id: dict(r.metrics) for p, r in stand_in.results}, recording.errors)


# ------------------------------------------------------------------ client side

def is_secure(content: RecordDict) -> bool:
    """A train message of a SecAgg+ round (the workflow adds its config record)."""
    return RECORD_KEY_CONFIGS in content.config_records


def secagg_if_configured(msg: Message, context: Context, call_next):
    """A ClientApp mod: SecAgg+ for the messages of a secure round, plain train messages pass through."""
    if is_secure(msg.content):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def secure_reply(arrays: list[np.ndarray], metrics: dict) -> RecordDict:
    """The reply secaggplus_mod masks: the arrays with weight 1, and metrics it passes on in the clear."""
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, metrics)
    return compat.fitres_to_recorddict(res, keep_input=True)
