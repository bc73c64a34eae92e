"""In-process simulation: one frozen base model in memory, the adapter swapped per client.

Clients are trained one after another on the same model object; each starts by
loading the global adapter through the adapter door (set_adapter), so no
client sees another's weights and memory does not grow with the client count.

A client algorithm's own state (SCAFFOLD's control variate) lives in the run
directory, one file per client and round it was made in
(``client_state/client_00003/round_0007.safetensors``). The client reads the
version of the round its FitIns names (the last round the server accepted its
update, recorded in state.json), so a version written by a round that crashed
or whose update was rejected is never read; it is overwritten when that round
is redone, and removed once a newer version is in use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from fedit import attacks, canaries, client
from fedit.checkpoint import atomic_write
from fedit.config import Config
from fedit.data.clients import ClientFiles
from fedit.errors import FeditError
from fedit.model import Loaded
from fedit.protocol import STATE_ROUND, Arrays, EvalIns, Evaluation, FitIns, Update
from fedit.strategies import STRATEGIES


class ClientStateDir:
    """Per-client state, versioned by the round that made it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _file(self, client_id: int, round_num: int) -> Path:
        return self.path / f"client_{client_id:05d}" / f"round_{round_num:04d}.safetensors"

    def load(self, client_id: int, round_num: int) -> Arrays | None:
        if round_num == 0:
            return None
        f = self._file(client_id, round_num)
        if not f.is_file():
            raise FeditError(f"the state client {client_id} saved in round {round_num} is missing ({f}); the run "
                             f"directory is incomplete: start the run again")
        from safetensors.torch import load_file

        return load_file(f)

    def save(self, client_id: int, round_num: int, state: Arrays, keep: int) -> None:
        """Write this round's version; drop every version but it and ``keep`` (the one it was made from)."""
        from safetensors.torch import save

        f = self._file(client_id, round_num)
        f.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(f, save({k: v.contiguous() for k, v in state.items()}))
        for old in f.parent.glob("round_*.safetensors"):
            if old.name not in (f.name, self._file(client_id, keep).name):
                old.unlink(missing_ok=True)


class Simulation:
    secure = False  # every update reaches the server on its own (fedit.server.Runtime)

    def __init__(self, loaded: Loaded, clients: ClientFiles, cfg: Config, state_dir: str | Path | None = None,
                 on_client: Callable[[int, int], Callable[[int, int], None] | None] | None = None):
        self.loaded, self.clients, self.cfg = loaded, clients, cfg
        self.algorithm = STRATEGIES[cfg.federation.strategy].client_algorithm
        self.states = ClientStateDir(state_dir) if state_dir is not None else None
        self.on_client = on_client  # (round, client) -> per-step callback, for progress bars
        self.attackers = attacks.attackers(cfg, clients.ids)  # experiments only: [attack]
        unknown = sorted((self.attackers | ({cfg.canary.client} if cfg.canary.client >= 0 else set())) -
                         set(clients.ids))
        if unknown:
            raise FeditError(f"attack.clients = {list(cfg.attack.clients)}, canary.client = {cfg.canary.client}: "
                             f"the partition has no client "
                             f"{', '.join(map(str, unknown))}; its clients are {clients.ids[0]}-{clients.ids[-1]}")

    def fit(self, round_num: int, instructions: list[FitIns]) -> Iterator[Update]:
        # A generator: each client trains only when the strategy asks for its update.
        for ins in instructions:
            cid, kept = ins.client_id, int(ins.config.get(STATE_ROUND, 0)) if self.algorithm.stateful else 0
            state = self.states.load(cid, kept) if self.states else None
            on_step = self.on_client(round_num, cid) if self.on_client else None
            seed = client.seed_for(self.cfg.federation.seed, round_num, cid)
            attack = self.cfg.attack if cid in self.attackers else None
            poisoned = (lambda rs: attacks.poison(rs, attack.trigger, attack.target)) \
                if attack and attack.kind == "backdoor" else None
            if cid == self.cfg.canary.client:  # experiments only: [canary] secrets in this client's data
                c, before = self.cfg.canary, poisoned
                poisoned = lambda rs: canaries.insert(before(rs) if before else rs,  # noqa: E731
                                                      canaries.secrets_of(c.seed, c.count, c.references)[0], c.repeats)
            update, new_state = client.train(self.loaded, ins, self.clients.examples(cid, poisoned), self.cfg.train,
                                             seed, self.algorithm, state, on_step)
            if attack:  # after honest training: the server sees what a real malicious client could send
                update = attacks.tamper(update, ins, attack.kind, attack.strength, seed)
            if new_state is not None:
                if self.states is None:
                    raise FeditError(f"strategy {self.cfg.federation.strategy} keeps client state, but this "
                                     f"simulation has no directory for it")
                self.states.save(cid, round_num, new_state, keep=kept)
            yield update

    def evaluate(self, round_num: int, instructions: list[EvalIns]) -> Iterator[Evaluation]:
        """Each client scores the global adapter on its own validation split (fedit.evaluation.federated)."""
        for ins in instructions:
            yield evaluate_client(self.loaded, ins, self.clients.validation_examples(ins.client_id), self.cfg)


def evaluate_client(loaded: Loaded, ins: EvalIns, examples: list, cfg: Config) -> Evaluation:
    """What a client sends back for an EvalIns: its validation split's loss sums per category. Shared by
    the simulation and the Flower ClientApp, so both score alike."""
    from fedit.evaluation.federated import category_sums
    from fedit.evaluation.heldout import heldout_loss

    if not examples:
        return Evaluation(ins.client_id, {}, 0)
    scored = heldout_loss(loaded, examples, ins.global_adapter, cfg.eval.batch_size, cfg.train.micro_batch_tokens)
    return Evaluation(ins.client_id, category_sums(examples, scored["examples"]), len(examples))
