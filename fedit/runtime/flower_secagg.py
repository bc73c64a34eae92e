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
when fewer than two were asked): nothing is unmasked, ``secure_sum`` returns None.
"""

from __future__ import annotations

import logging
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

log = logging.getLogger("fedit.flower")


def error_bound(clients: int, clipping_range: float, quantization_range: int) -> float:
    """The largest error per value of the unmasked sum: stochastic rounding moves each client's value
    by less than one quantisation step, 2c/Q."""
    return clients * 2 * clipping_range / quantization_range


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


@dataclass
class SecureSum:
    total: list[np.ndarray]  # Σ over the contributors of the arrays each sent, in their order
    contributors: list[int]  # node ids whose arrays are in the sum
    metrics: dict[int, dict] = field(default_factory=dict)  # node id -> what it reported in the clear


def secure_sum(grid, round_num: int, contents: dict[int, RecordDict], sc, clipping_range: float,
               timeout: float | None) -> SecureSum | None:
    """Run SecAgg+ over the nodes of ``contents`` (node id -> train content); None if it halted.
    ``sc`` is the run's SecAggConfig."""
    if len(contents) < 2:
        return None
    stand_in = _Round(grid, list(contents))
    legacy = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                                   run_config={}), strategy=stand_in)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_num})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # read, and not used, by setup_stage
    workflow = _Workflow(float(sc.num_shares), float(sc.reconstruction_threshold), max_weight=1.0,
                         clipping_range=clipping_range, quantization_range=sc.quantization_range,
                         modulus_range=sc.modulus_range, timeout=timeout)
    workflow.contents = contents
    workflow(grid, legacy)
    if not stand_in.results:
        return None
    mean = parameters_to_ndarrays(stand_in.results[0][1].parameters)  # every result carries the same aggregate
    n = len(stand_in.results)
    return SecureSum([m * n for m in mean], [p.node_id for p, _ in stand_in.results],
                     {p.node_id: dict(r.metrics) for p, r in stand_in.results})


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
