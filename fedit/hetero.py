"""Clients with different means (the paper's Section 2.2): each client's LoRA rank and target modules.

The global adapter has the global rank R = ``lora.r`` on every target module. Client k trains a
rank-r_k LoRA (r_k ≤ R) on its own subset of the modules, with its own scaling s_k = alpha_k / r_k
(alpha_k = lora.alpha unless lora.clients_file gives the client its own):

- down: it receives, per module it targets, the first r_k rows of A and the first r_k columns of B
  (HetLoRA's placement, Cho et al. 2024), B rescaled by s_R / s_k so that s_k · B_k A_k is the
  global's rank-r_k part; with ``lora.aggregation = "product"`` it receives instead the best
  rank-r_k approximation of the global product s_R · B A (FlexLoRA, Bai et al. 2024);
- it trains those slices only (fedit.client pads them to R with zeros inside the one model and
  masks the rest), and sends back the same slices;
- up (``factors``): its slices go back where they came from, B rescaled by s_k / s_R, the rest of
  the adapter as the global had it; the server's optimiser then averages the changes. A client
  that does not hold a row or module leaves it as it was (the change is zero-padded, so server
  optimisers compose; HetLoRA pads the weights themselves, which shrinks the high-rank rows
  towards zero by the share of low-rank clients every round);
- ``product``: the server forms ΔW = Σ p_k s_k B_k A_k per module over the clients that target it
  (weights renormalised among them) and keeps its best rank-R approximation (fedit/lowrank.py,
  no d × n matrix), split with A's rows at the clients' A scale so the next step trains as fast as
  from averaged factors; FedAvg or FedProx only, since the mean of products is not a step on the factors;
- ``lora.freeze_a`` (FFA-LoRA, Sun et al. ICLR 2024): A stays at its seeded init for every client and
  round; only B trains and travels. The mean of the products is then exact with any strategy.

With every client at the global rank and targets, and neither option set, nothing here runs and
training is the paper's.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch

from fedit.errors import FeditError
from fedit.protocol import ADAPTER, GLOBAL, Arrays, FitIns, Update

RANK, TARGETS, FREEZE_A, SCALING = "lora_rank", "lora_targets", "lora_freeze_a", "lora_scaling"  # FitIns.config keys


@dataclass(frozen=True)
class ClientLora:
    r: int
    targets: tuple[str, ...] = ()  # module names (the last part of a module's path); (): every module
    alpha: float | None = None  # its own LoRA alpha; None: lora.alpha


def module_of(key: str) -> str:
    """``...self_attn.q_proj.lora_A.weight`` -> ``...self_attn.q_proj``."""
    return key.rsplit(".lora_", 1)[0]


def short_name(key: str) -> str:
    return module_of(key).rsplit(".", 1)[-1]


def is_a(key: str) -> bool:
    return ".lora_A." in key


def client_loras(cfg, client_ids: list[int], module_names: set[str]) -> dict[int, ClientLora] | None:
    """Each client's rank and targets from lora.client_ranks or lora.clients_file; None if uniform."""
    lora = cfg.lora
    if not lora.client_ranks and not lora.clients_file:
        return None
    problems = []
    out: dict[int, ClientLora] = {}
    if lora.client_ranks:
        ranks = list(lora.client_ranks)
        out = {cid: ClientLora(ranks[cid % len(ranks)]) for cid in client_ids}
    else:
        path = Path(lora.clients_file)
        try:
            table = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise FeditError(f"lora.clients_file = {str(path)!r} cannot be read: {e}") from None
        for key, entry in table.items():
            where = f"lora.clients_file {path}: client {key!r}"
            if not key.lstrip("-").isdigit() or int(key) not in client_ids:
                ids = (f"{client_ids[0]}-{client_ids[-1]}" if client_ids == list(range(client_ids[0], client_ids[-1] + 1))
                       else ", ".join(map(str, client_ids[:20])) + (", ..." if len(client_ids) > 20 else ""))
                problems.append(f"{where} is not a client of the partition (its ids are {ids}); remove it or fix the id")
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("r"), int) or isinstance(entry.get("r"), bool):
                problems.append(f"{where} needs a whole-number r, e.g. [{key}] r = 4")
                continue
            targets = entry.get("target_modules", [])
            if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
                problems.append(f"{where}: target_modules must be a list of module names")
                continue
            unknown = sorted(set(targets) - module_names)
            if unknown:
                problems.append(f"{where}: target_modules {unknown} are not adapted modules of the model "
                                f"(it has {sorted(module_names)})")
            unknown_keys = sorted(set(entry) - {"r", "target_modules", "alpha"})
            if unknown_keys:
                problems.append(f"{where}: unknown setting(s) {unknown_keys}; a client takes r, target_modules "
                                f"and alpha")
            alpha = entry.get("alpha")
            if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0):
                problems.append(f"{where}: alpha must be a positive number, e.g. alpha = 16")
                alpha = None
            if not 1 <= entry["r"] <= lora.r:
                problems.append(f"{where} has r = {entry['r']}: client ranks must be between 1 and the global rank "
                                f"lora.r = {lora.r}; lower it or raise lora.r")
            out[int(key)] = ClientLora(entry["r"], tuple(targets), None if alpha is None else float(alpha))
        for cid in client_ids:  # a client the file does not name trains at the global rank
            out.setdefault(cid, ClientLora(lora.r))
    if problems:
        raise FeditError(f"{len(problems)} problem(s) with the clients' LoRA settings:\n"
                         + "\n".join(f"  - {p}" for p in problems))
    return out


class LoraPlan:
    """What each client holds of the global adapter, and the way back."""

    def __init__(self, cfg, clients: dict[int, ClientLora] | None, initial_adapter: Arrays | None = None):
        self.R, self.alpha = cfg.lora.r, cfg.lora.alpha
        self.mode, self.freeze_a = cfg.lora.aggregation, cfg.lora.freeze_a
        self.clients = clients or {}
        self.init = initial_adapter or {}  # the seeded LoRA init: spare rank starts from it (product)
        self._svds: tuple = (None, {})  # (round, global adapter) -> each module's SVD of its product

    @property
    def active(self) -> bool:
        return bool(self.clients) or self.mode == "product" or self.freeze_a

    def table(self) -> dict[str, dict]:
        """Each client's rank and modules as run.json keeps them (a resume checks them against it)."""
        return {str(cid): {"r": c.r, "target_modules": list(c.targets), "alpha": self.alpha_of(c)}
                for cid, c in sorted(self.clients.items())}

    def alpha_of(self, c: ClientLora) -> float:
        return float(self.alpha if c.alpha is None else c.alpha)

    def scaling(self, c: ClientLora) -> float:
        """s_k = alpha_k / r_k: the client's own LoRA scaling."""
        return self.alpha_of(c) / c.r

    def profile(self, cid: int) -> ClientLora:
        return self.clients.get(cid, ClientLora(self.R))

    def keys(self, cid: int, adapter_keys) -> list[str]:
        """The adapter keys client ``cid`` trains and sends."""
        c = self.profile(cid)
        return [k for k in adapter_keys if (not c.targets or short_name(k) in c.targets)
                and not (self.freeze_a and is_a(k))]

    # ------------------------------------------------------------ server -> client

    def down(self, ins: FitIns) -> FitIns:
        c = self.profile(ins.client_id)
        g = ins.global_adapter
        sliced = {}
        if self.mode == "product":
            sliced = self._product_truncation(ins.round, g, c)
        else:
            ratio = self.alpha / self.R / self.scaling(c)  # B · s_R / s_k: the same product at scaling s_k
            for k in self.keys(ins.client_id, g):
                sliced[k] = g[k][:c.r] if is_a(k) else g[k][:, :c.r] * ratio
        config = {**ins.config, RANK: c.r, TARGETS: ",".join(c.targets), FREEZE_A: self.freeze_a,
                  SCALING: self.scaling(c)}
        return FitIns(ins.round, ins.client_id, {**ins.arrays, GLOBAL: sliced}, config)

    def _product_truncation(self, round_num: int, g: Arrays, c: ClientLora) -> Arrays:
        from fedit.lowrank import product_svd, rms_row_norm, truncate

        if self._svds[0] != (round_num, id(g)):  # one SVD per module and round, whatever the clients' ranks
            self._svds = ((round_num, id(g)), {})
        svds = self._svds[1]
        out = {}
        for a_key in [k for k in g if is_a(k) and (not c.targets or short_name(k) in c.targets)]:
            b_key = a_key.replace(".lora_A.", ".lora_B.")
            if a_key not in svds:
                svds[a_key] = product_svd([g[b_key]], [g[a_key]], [self.alpha / self.R])
            u, s, vh = svds[a_key]
            # A keeps the global A's scale (its rows' RMS norm), B takes the rest: the client's next
            # AdamW step changes the product as much as it would from the global's own factors
            b, a = truncate(u, s, vh, c.r, self.scaling(c), rms_row_norm(g[a_key]))
            # Directions the global product does not have (all of them in round 1, where B = 0) would
            # come back as a zero row of A and a zero column of B, which no gradient can move: they
            # start as LoRA starts, A from the seeded init, B zero. The product is unchanged.
            live = int((s[:c.r] > 1e-12 * max(float(s[0]), 1e-300)).sum()) if s.numel() else 0
            if live < c.r and a_key in self.init:
                a[live:] = self.init[a_key][live:c.r].double()
                b[:, live:] = 0
            out[a_key], out[b_key] = a.float(), b.float()
        return out

    # ------------------------------------------------------------ client -> server

    def up(self, update: Update, global_adapter: Arrays) -> Update:
        """factors / freeze_a: the client's slices put back into a full-rank adapter."""
        c = self.profile(update.client_id)
        ratio = self.scaling(c) / (self.alpha / self.R)  # B · s_k / s_R
        full = {k: v.clone() for k, v in global_adapter.items()}
        for k, v in update.adapter.items():
            if is_a(k):
                full[k][:c.r] = v
            else:
                full[k][:, :c.r] = v * ratio
        return Update(update.client_id, {**update.arrays, ADAPTER: full}, update.num_examples, update.metrics)

    def product_mean(self, global_adapter: Arrays, updates) -> tuple[Arrays, int]:
        """FlexLoRA: per module, the best rank-R approximation of Σ p_k s_k B_k A_k over the clients
        that hold it (p_k renormalised among them); modules no client held keep the global's."""
        from fedit.lowrank import product_svd, truncate

        held: dict[str, list] = {}
        used = 0
        # in client order, not arrival order: the stacked factors' order fixes the SVD's signs, so a
        # Flower round gives the factors (not only the products) of the same round in-process
        for u in sorted(updates, key=lambda u: u.client_id):
            c = self.profile(u.client_id)
            for k, a in u.adapter.items():
                if is_a(k):
                    held.setdefault(k, []).append((u.num_examples, self.scaling(c), u.adapter[k.replace(".lora_A.", ".lora_B.")], a))
            used += 1
        out = dict(global_adapter)
        for a_key, items in held.items():
            total = sum(n for n, *_ in items)
            u_, s, vh = product_svd([b for *_, b, _ in items], [a for *_, a in items],
                                    [n / total * scale for n, scale, *_ in items])
            # Re-split with A at the clients' scale, ρ² = Σ p_k · (mean squared row norm of A_k), not √σ in
            # both factors: √σ shrinks A far below it for a small ΔW, and with it the effect of the next
            # AdamW step on the product (an effective learning-rate cut that factors mode does not have).
            rho = sum(n / total * float(a.double().pow(2).sum()) / a.shape[0] for n, _, _, a in items) ** 0.5
            b, a = truncate(u_, s, vh, self.R, self.alpha / self.R, rho or None)
            out[a_key], out[a_key.replace(".lora_A.", ".lora_B.")] = a.float(), b.float()
        return out, used


# ---------------------------------------------------------------- client side, inside the one model

def expand(sent: Arrays, template: Arrays, rank: int, R: int, freeze_a: bool) -> Arrays:
    """The full-rank adapter a client trains: its slices, zeros elsewhere (A from the seeded init with
    freeze_a). Rows of A and columns of B beyond ``rank`` stay zero, so the model computes exactly a
    rank-``rank`` LoRA."""
    full = {k: torch.zeros_like(v) for k, v in template.items()}
    if freeze_a:
        trained = {module_of(k) for k in sent}
        for k, v in template.items():
            if is_a(k) and module_of(k) in trained:
                full[k][:rank] = v[:rank]
    for k, v in sent.items():
        if is_a(k):
            full[k][:rank] = v
        else:
            full[k][:, :rank] = v
    return full


def restrict(full: Arrays, keys, rank: int) -> Arrays:
    """What a client sends: its keys, cut to its rank."""
    return {k: (full[k][:rank] if is_a(k) else full[k][:, :rank]).contiguous() for k in keys}


class RankMask:
    """Zeroes the gradients a rank-r client must not use: rows ≥ r of A, columns ≥ r of B, and every
    parameter it does not train (other modules; A under freeze_a)."""

    def __init__(self, keys, rank: int):
        self.keys, self.rank = set(keys), rank

    def __call__(self, params: dict[str, torch.Tensor]) -> None:
        for k, p in params.items():
            if p.grad is None:
                continue
            if k not in self.keys:
                p.grad.zero_()
            elif is_a(k):
                p.grad[self.rank:] = 0
            else:
                p.grad[:, self.rank:] = 0


def set_scaling(model, scaling: float) -> dict:
    """Set every LoRA layer's scaling; return the old values for ``restore_scaling``."""
    from peft.tuners.lora import LoraLayer

    old = {}
    for m in model.modules():
        if isinstance(m, LoraLayer):
            old[m] = dict(m.scaling)
            for name in m.scaling:
                m.scaling[name] = scaling
    return old


def restore_scaling(old: dict) -> None:
    for m, values in old.items():
        m.scaling.update(values)
