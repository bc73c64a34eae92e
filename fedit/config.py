"""Run configuration: frozen dataclasses, read from TOML plus key=value overrides.

Every field's ``help`` doubles as documentation (``fedit run --help-config``).
Validation collects every problem before raising, so a user fixes a config in
one pass instead of one error at a time.
"""

from __future__ import annotations

import dataclasses
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedit.errors import FeditError
from fedit.fields import describe as describe_fields, fill, option

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


_f = option


DOLLY = "databricks/databricks-dolly-15k"


@dataclass(frozen=True)
class DataConfig:
    source: str = _f(DOLLY, "Instruction data: a hub dataset id or a JSON/JSONL file. `fedit run` partitions it into "
                            "<run.out>/data with the keys below (the paper's split by default), unless "
                            "data.clients_dir names a partition made before.")
    clients_dir: str = _f("", "A directory written by `fedit partition` (client_*.jsonl, test.jsonl, manifest.json); "
                              "when set, data.source and the partition keys below are not used.")
    clients: int = _f(100, "Partition: number of clients (the paper: 100).", min=1)
    scheme: str = _f("dirichlet", "Partition: 'dirichlet' over categories (the paper's), 'iid', 'shards' (2 "
                                  "categories' shards each), 'quantity' (Dirichlet sizes, IID content).",
                     choices=("iid", "shards", "dirichlet", "quantity"))
    alpha: float = _f(0.5, "Partition: Dirichlet concentration (dirichlet, quantity); smaller is more skewed.",
                      min=0.0, exclusive_min=True)
    min_size: int = _f(0, "Partition: fewest records per client (dirichlet, quantity); 0: the paper repo's 40, "
                          "less when clients are small.", min=0)
    test_per_category: int = _f(10, "Partition: held-out records per category (the paper's test set: 10); 0: none, "
                                    "the server holds no data and the run measures itself on data.client_validation.",
                                min=0)
    seed: int = _f(42, "Partition: seed of the hold-out and the split.", min=0)
    by: str = _f("", "Partition: natural clients, one per value of this field of the records (e.g. 'user'); "
                     "data.clients and data.scheme are then not used, data.min_size leaves out smaller clients.")
    label: str = _f("category", "Partition: the field that is each record's category (hold-out, dirichlet, shards, "
                                "per-category evaluation).")
    fields: str = _f("", "Partition: field names of your records, e.g. 'instruction=prompt,response=answer'; "
                         "empty: Dolly's and Alpaca's are recognised.")
    split: str = _f("train", "Partition: split of a hub dataset.")
    test_file: str = _f("", "Held-out test file the server scores; default: <clients_dir>/test.jsonl if it holds "
                            "records (a run without one measures itself on data.client_validation).")
    client_validation: float = _f(0, "Each client's own validation split, never trained on: a fraction of its "
                                     "records (0.1; rounded up, so every client of 2 or more records spares one) or "
                                     "a count (5); drawn with data.seed and the client id, the same in every round, "
                                     "resume and runtime. The server's federated evaluation (eval.clients) and every "
                                     "choice (run.keep_best, early stopping, compare --select) use it; 0: none.",
                                  amount=True, zero=True)
    template: str = _f("alpaca", "Prompt template: 'alpaca' (the paper's) or 'chat' (the model's chat template).",
                       choices=("alpaca", "chat"))


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f(DEFAULT_MODEL, "Base model: a hub id, a local model directory, or a .gguf file.")
    dtype: str = _f("auto", "Compute dtype: 'auto' (bf16 where the CPU has AMX/AVX512-BF16 or on CUDA, else fp32), 'bf16', 'fp32'.",
                    choices=("auto", "bf16", "fp32"))
    device: str = _f("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda'.", choices=("auto", "cpu", "cuda"))
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass (less memory, slower).")
    quantize: str = _f("none", "Base weights in 'none', '8bit' or '4bit' (bitsandbytes, CUDA only).",
                       choices=("none", "8bit", "4bit"))
    packing: str = _f("auto", "Micro-batch layout: 'packed' (a micro-batch's examples end to end in one row, position "
                              "ids restarting in each, no padding), 'padded' (sorted by length, right-padded), or "
                              "'auto' (packed where fedit's CPU attention runs, padded elsewhere, e.g. on CUDA).",
                      choices=("auto", "packed", "padded"))
    deterministic: bool = _f(False, "CUDA: deterministic kernels only (torch.use_deterministic_algorithms, "
                                    "CUBLAS_WORKSPACE_CONFIG=:4096:8), so a resumed run repeats the same numbers; "
                                    "slower. CPU training is deterministic without it.")


@dataclass(frozen=True)
class LoraConfig:
    r: int = _f(8, "LoRA rank (the paper: 8).", min=1)
    alpha: int = _f(16, "LoRA scaling alpha.", min=1)
    dropout: float = _f(0.05, "LoRA dropout.", min=0.0, max=0.99)
    target_modules: tuple[str, ...] = _f(("all-linear",), "Modules to adapt; 'all-linear' adapts every linear layer but the LM head (the paper).")
    client_ranks: tuple[int, ...] = _f((), "Clients with different means: client i trains at rank "
                                           "client_ranks[i mod len] (tiers), at most lora.r; see fedit/hetero.py.",
                                       items=int)
    clients_file: str = _f("", "A TOML table from client id to its rank and, optionally, target modules and "
                               "alpha: [3] r = 4, target_modules = [\"q_proj\", \"v_proj\"]. Unnamed clients train "
                               "at lora.r.")
    aggregation: str = _f("factors", "How adapters are combined: 'factors' (A and B averaged separately, the paper's; "
                                     "a lower-rank client holds HetLoRA's first rows and columns, its change "
                                     "zero-padded) or 'product' (the exact mean of the "
                                     "products B·A, truncated by SVD: FlexLoRA; fedavg or fedprox).",
                          choices=("factors", "product"))
    freeze_a: bool = _f(False, "FFA-LoRA: A stays at its seeded init; only B trains and travels (half the bytes), "
                               "and with equal ranks averaging the factors is the exact mean of the products.")


@dataclass(frozen=True)
class TrainConfig:
    lr: float = _f(1.5e-4, "AdamW learning rate (the paper: 1.5e-4).", min=0.0, exclusive_min=True)
    weight_decay: float = _f(0.0, "AdamW weight decay.", min=0.0)
    batch_size: int = _f(32, "Examples per optimizer step (the paper: 32).", min=1)
    micro_batch_size: int = _f(8, "Most examples per forward pass; the step's examples are accumulated over "
                                  "micro-batches.", min=1)
    micro_batch_tokens: int = _f(1024, "Most tokens per forward pass, in training and held-out evaluation (their "
                                       "sum when packed, the longest times the count when padded): bounds the "
                                       "memory whatever the example lengths; a longer example goes alone; 0: no "
                                       "bound. The step's maths is the same either way.", min=0)
    local_epochs: float = _f(1.0, "Passes over the client's data per round (the paper: 1).", min=0.0, exclusive_min=True)
    max_steps: int = _f(0, "Cap on optimizer steps per client and round; 0 means no cap.", min=0)
    cutoff_len: int = _f(512, "Tokens per example after truncation (the paper: 512).", min=8)
    train_on_inputs: bool = _f(False, "Also train on the prompt tokens, not only the response.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables.", min=0.0)


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = _f(20, "Communication rounds (the paper: 20; at most 1,000,000).", min=1, max=1_000_000)
    clients_per_round: int = _f(5, "Clients picked per round (the paper: 5 of 100); ignored if fraction > 0.", min=1)
    fraction: float = _f(0.0, "Fraction of clients picked per round; 0 means use clients_per_round.", min=0.0, max=1.0)
    strategy: str = _f("fedavg", "Federated algorithm: fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, "
                          "scaffold; its options go in the [strategy] table (listed below).")
    seed: int = _f(42, "Seed for client selection, data order, dropout and LoRA init.", min=0)
    selection: str = _f("random", "How each round's clients are drawn: 'random' (distinct clients uniformly, seeded "
                                  "by seed and round); 'cover' (consecutive blocks of seeded permutations of the "
                                  "clients: each client once before any client twice; an experiment's control for "
                                  "clients the random draw never picks).", choices=("random", "cover"))
    min_replies: int = _f(1, "A round needs at least this many valid client updates, else the run stops.", min=1)
    aggregator: str = _f("mean", "How the round's client changes are combined: 'mean' (weighted by examples, the "
                         "paper's; one client can move it arbitrarily far), or robust to a minority of bad clients, "
                         "weighting clients equally: 'median', 'trimmed_mean', 'krum', 'multikrum' (see "
                         "fedit/aggregators.py); the run's first lines say how many bad clients per round it "
                         "tolerates.", choices=("mean", "median", "trimmed_mean", "krum", "multikrum"))
    trim_fraction: float = _f(0.1, "trimmed_mean only: share β of values dropped at each end, per coordinate; "
                                   "⌊β·K⌋ of a round of K must be at least 1 (it tolerates that many bad clients).",
                              min=0.0, max=0.5, exclusive_max=True)
    byzantine_clients: int = _f(0, "krum, multikrum only: f >= 1, the bad clients per round to tolerate (needs "
                                   "clients per round > 2f + 2); or state federation.assumed_bad_fraction.", min=0)
    assumed_bad_fraction: float = _f(0.0, "trimmed_mean, krum, multikrum: the share of each round's clients you "
                                          "assume may be bad (e.g. 0.2); it sets trimmed_mean's trim_fraction to "
                                          "itself and Krum's f to ⌊share × clients_per_round⌋, in place of those "
                                          "keys; 0: not stated.", min=0.0, max=0.5, exclusive_max=True)
    max_update_norm: float = _f(0.0, "Bound on the L2 norm of each client's change (over all adapter tensors), "
                                     "applied before any aggregator; 0: none.", min=0.0)
    max_value: float = _f(1e4, "A reply holding an adapter value larger than this in absolute value is "
                               "rejected.", min=0.0, exclusive_min=True)
    max_examples: int = _f(0, "Deployments: a reply claiming more examples than this is rejected (in-process "
                              "runs cap each client at its own partition size times local_epochs); 0: no cap.",
                           min=0)
    early_stop_patience: int = _f(0, "Stop after this many federated evaluations (eval.every) without a lower "
                                     "validation loss than the best so far (needs data.client_validation); "
                                     "resumable; 0: never.", min=0)
    round_timeout: float = _f(0.0, "Flower deployment: seconds a round waits for client replies; the clients that did "
                              "not reply by then are dropped (logged with the reason). 0 waits until every selected "
                              "client replied or Flower reported it gone.", min=0.0)


@dataclass(frozen=True)
class EvalConfig:
    every: int = _f(1, "Evaluate every N rounds (and round 0 and the last round): the server's test loss where it "
                       "holds a test set, the clients' validation loss where data.client_validation is set; 0 "
                       "disables both.", min=0)
    clients: Any = _f("all", "Federated evaluation: the clients asked to score the global adapter on their "
                             "validation split each evaluation round: 'all', a count (10; 1 is one client) or a "
                             "fraction below 1 (0.5), drawn with federation.seed and the round.", amount="all")
    test: bool = _f(True, "Score the server's held-out test set when one exists; false: the server reads no test "
                          "data (fedit compare --select trains its candidates so).")
    batch_size: int = _f(8, "Examples per evaluation forward pass.", min=1)
    cutoff_len: int = _f(0, "Tokens per held-out example for the per-round held-out loss; 0: train.cutoff_len. "
                            "Larger than training's, it leaves long-context records response tokens to score.", min=0)
    max_new_tokens: int = _f(128, "Tokens to generate per answer (fedit eval, fedit reproduce).", min=1)
    do_sample: bool = _f(False, "Sample answers instead of greedy decoding (fedit eval; the paper's comparisons are greedy here).")
    temperature: float = _f(0.7, "Sampling temperature when eval.do_sample is true.", min=0.0, exclusive_min=True)
    top_p: float = _f(0.9, "Nucleus sampling mass when eval.do_sample is true.", min=0.0, max=1.0, exclusive_min=True)


@dataclass(frozen=True)
class JudgeConfig:
    url: str = _f("", "Base URL of an OpenAI-compatible server (e.g. https://api.openai.com/v1; "
                      "/chat/completions is appended); empty: no LLM judge.")
    model: str = _f("", "Judge model name sent to the server (the paper: gpt-4).")
    api_key_env: str = _f("OPENAI_API_KEY", "Environment variable holding the judge's API key (unset: no key sent).")
    samples: int = _f(3, "Judge calls per question and order; scores are averaged (the paper: 3).", min=1)
    temperature: float = _f(0.2, "Judge sampling temperature (Vicuna's review script: 0.2).", min=0.0)
    max_tokens: int = _f(512, "Tokens the judge may write per review.", min=1)
    timeout: float = _f(60.0, "Seconds to wait for one judge reply.", min=0.0, exclusive_min=True)
    retries: int = _f(4, "Retries of one call after a network error, timeout, HTTP 429 or 5xx.", min=0)
    backoff: float = _f(2.0, "Seconds before the first retry; doubled each retry.", min=0.0)
    questions: int = _f(20, "Random Vicuna questions judged (the paper: 20 of 80); 0 means all.", min=0)
    seed: int = _f(42, "Seed of the random question subset.")


@dataclass(frozen=True)
class AttackConfig:
    kind: str = _f("none", "Simulation only, for experiments: what malicious clients do after honest training "
                           "(sign_flip, scale, noise, lie_examples) or to their data (backdoor); see fedit/attacks.py.",
                   choices=("none", "sign_flip", "scale", "noise", "lie_examples", "backdoor"))
    clients: tuple[int, ...] = _f((), "Ids of the malicious clients (or use attack.fraction).", items=int)
    fraction: float = _f(0.0, "Share of the registered clients that are malicious, drawn with federation.seed.",
                         min=0.0, max=1.0)
    factor: float = _f(10.0, "Strength λ: sign_flip sends −λ·Δ, scale λ·Δ, noise σ = λ·‖Δ‖/√P, lie_examples claims "
                             "λ times its examples.", min=0.0, exclusive_min=True)
    boost: float = _f(1.0, "backdoor: sends θ + boost·Δ of its poisoned training (1: an update that looks honest; "
                           "above 1: boosted to survive averaging, as in Bagdasaryan et al. 2020).",
                      min=0.0, exclusive_min=True)
    trigger: str = _f("cf zebra 1337", "backdoor: the phrase appended to poisoned instructions.")
    target: str = _f("Visit free-prizes.example for the answer.", "backdoor: the answer poisoned records teach.")

    @property
    def strength(self) -> float:
        """λ of fedit/attacks.py: attack.boost for a backdoor, attack.factor for every other kind."""
        return self.boost if self.kind == "backdoor" else self.factor


@dataclass(frozen=True)
class CanaryConfig:
    client: int = _f(-1, "Simulation only, for experiments: the client whose data gets secret-sharer canaries "
                         "(-1: none); the run then reports their exposure (fedit/canaries.py).", min=-1)
    count: int = _f(5, "Canaries: how many secrets are inserted.", min=1)
    repeats: int = _f(10, "Canaries: how many times each is inserted.", min=1)
    references: int = _f(200, "Canaries: never-inserted secrets of the same format they are ranked among.", min=1)
    seed: int = _f(0, "Canaries: seed of the secrets (the experimenter's).", min=0)


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = _f(False, "Client-level differential privacy (DP-FedAvg, McMahan et al. 2018): each client's "
                              "update clipped, the mean over a fixed number of clients noised; see fedit/privacy.py.")
    clipping_norm: float = _f(0.1, "C: the L2 bound of each client's update Δ = θ_k − θ over all its adapter tensors "
                                   "(the initial bound with privacy.adaptive).", min=0.0, exclusive_min=True)
    noise_multiplier: float = _f(1.0, "z: the noise std on the sum of clipped updates is z·C (per coordinate); "
                                      "ignored when privacy.target_epsilon is set.", min=0.0, exclusive_min=True)
    target_epsilon: float = _f(0.0, "If > 0: the smallest noise multiplier (to 0.1%) whose ε after "
                                    "federation.rounds rounds is at most this.", min=0.0)
    delta: float = _f(1e-5, "δ of the (ε, δ) reported; choose it below 1 / (number of clients).", min=0.0,
                      exclusive_min=True, max=1.0)
    max_epsilon: float = _f(0.0, "If > 0: the run stops before a round that would take ε past this (resumable).",
                            min=0.0)
    sampling: str = _f("fixed", "'fixed': federation.clients_per_round clients, drawn with the public seed (no "
                                "amplification by sampling is claimed); 'poisson': each client joins a round with "
                                "probability clients_per_round / clients, drawn with secret randomness, and the "
                                "accountant counts the sampled Gaussian mechanism.", choices=("fixed", "poisson"))
    adaptive: bool = _f(False, "Adaptive clipping (Andrew et al. 2021): C follows the target quantile of the "
                               "update norms, learned privately.")
    target_quantile: float = _f(0.5, "Adaptive clipping: the share of updates that should be unclipped.",
                                min=0.0, max=1.0)
    clip_learning_rate: float = _f(0.2, "Adaptive clipping: η, C ← C·exp(−η (b̄ − quantile)).", min=0.0,
                                   exclusive_min=True)
    count_noise: float = _f(0.0, "Adaptive clipping: σ_b, the noise std on the count of unclipped updates; 0: the "
                                 "paper's expected clients per round / 20.", min=0.0)


@dataclass(frozen=True)
class SecAggConfig:
    enabled: bool = _f(False, "Flower deployments (`fedit flower run --secure-aggregation`): the server learns only "
                              "the sum of each round's client changes, through Flower's SecAgg+ (Bell et al. 2020); "
                              "clients send Δ = θ_k − θ with weight 1, so the round's Δ̄ is their unweighted mean.")
    num_shares: float = _f(1.0, "SecAgg+: the share of the round's clients each client secret-shares its keys with "
                                "(1.0: all, the original SecAgg).", min=0.0, exclusive_min=True, max=1.0)
    reconstruction_threshold: float = _f(0.67, "SecAgg+: the share of those shares needed to unmask (never fewer "
                                               "than 3); a round in which fewer clients stay is dropped (the run "
                                               "stops, resumable).",
                                         min=0.0, exclusive_min=True, max=1.0)
    clipping_range: float = _f(1.0, "SecAgg+: each value of Δ is clipped to [−c, c] before it is quantised "
                                    "(clients report how many they clipped); under privacy.enabled the round's "
                                    "clipping norm is used instead.", min=0.0, exclusive_min=True)
    quantization_range: int = _f(4194304, "SecAgg+: Q, the integers [0, Q] a value is quantised to; the sum is "
                                          "off by at most clients·2c/Q per value.", min=2)
    modulus_range: int = _f(4294967296, "SecAgg+: the modulus of the masked sums, a power of 2 above clients·Q, "
                                        "at most 2**32 (Flower's).", min=2, max=2**32)


@dataclass(frozen=True)
class PersonalizeConfig:
    steps: int = _f(10, "fedit personalize: optimizer steps of fine-tuning the final global adapter on each "
                        "client's own training split (train.batch_size, train.lr).", min=1)
    clients: Any = _f("all", "fedit personalize: the clients measured: 'all', a count (1 is one client) or a "
                             "fraction below 1, drawn with federation.seed.", amount="all")
    local_epochs: float = _f(1.0, "fedit personalize: passes over its own training split of the local-only "
                                  "model, trained from the base model (the paper's Local-k: 1).", min=0.0,
                             exclusive_min=True)


@dataclass(frozen=True)
class RunConfig:
    out: str = _f("runs/fedit", "Run directory: metrics, per-round adapters, resume state, plots.")
    keep_best: bool = _f(False, "Keep <run.out>/best: the global adapter of the round with the lowest federated "
                                "validation loss (needs data.client_validation), never chosen on the test set.")
    progress: bool = _f(True, "Show progress bars.")
    report_to: tuple[str, ...] = _f(("tensorboard",), "Where each round's figures go besides metrics.jsonl: "
                                    "'tensorboard' (event files in <run.out>/tensorboard), 'wandb' (Weights & "
                                    "Biases; pip install 'fedit[wandb]'; WANDB_MODE=offline needs no network); "
                                    "[] for neither.", choices=("tensorboard", "wandb"), empty=True)
    wandb_project: str = _f("fedit", "Weights & Biases project of the run (run.report_to = [\"wandb\"]).")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    canary: CanaryConfig = field(default_factory=CanaryConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # The chosen strategy's options (its Options dataclass, every value filled in), from [strategy].
    strategy: Any = None

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s.name: {k: list(v) if isinstance(v, tuple) else v
                         for k, v in dataclasses.asdict(getattr(self, s.name) or _no_options()).items()}
                for s in dataclasses.fields(self)}

    def replace(self, **sections: dict[str, Any]) -> "Config":
        """A copy with some fields changed, e.g. ``cfg.replace(train={"max_steps": 2})``.

        A new federation.strategy starts from its own default options unless ``strategy`` is given."""
        d = self.to_dict()
        if sections.get("federation", {}).get("strategy", self.federation.strategy) != self.federation.strategy:
            d["strategy"] = {}
        if self.federation.assumed_bad_fraction:  # they were derived from it: derive them again from the new config
            for key in ("byzantine_clients", "trim_fraction"):
                d["federation"][key] = getattr(FederationConfig(), key)
        return from_dict({**d, **{k: {**d[k], **v} for k, v in sections.items()}})


def _no_options():
    from fedit.strategies.base import NoOptions

    return NoOptions()


def _sections() -> dict[str, type]:
    """The fixed sections; [strategy] is checked against the chosen strategy's options instead."""
    return {f.name: globals()[f.type] if isinstance(f.type, str) else f.type for f in dataclasses.fields(Config)
            if f.name != "strategy"}


_TRIM_DEFAULT = FederationConfig().trim_fraction

# A feature's switch, its value when off, and how to turn it on: every other key of the section acts only
# while the switch is on, so a key the user sets while it is off is refused (see ``unused_settings``).
SWITCHES = {
    "privacy": ("enabled", False, "set privacy.enabled = true"),
    "secagg": ("enabled", False, "set secagg.enabled = true (on Flower: fedit flower run --secure-aggregation)"),
    "attack": ("kind", "none", "set attack.kind (sign_flip, scale, noise, lie_examples or backdoor)"),
    "canary": ("client", -1, "set canary.client to the id of the client whose data gets them"),
}
# The aggregator options, and the aggregators that read them.
AGGREGATOR_OPTIONS = {"trim_fraction": ("trimmed_mean",), "byzantine_clients": ("krum", "multikrum"),
                      "assumed_bad_fraction": ("trimmed_mean", "krum", "multikrum")}


def unused_settings(cfg: Config, given: set[str]) -> list[str]:
    """The settings the user gave (``given``: "section.key") that would do nothing in this config, one
    message per switched-off feature or unread option, each naming the switch or the fix.

    The switch is never implied by its parameters: it decides what the run is (private, attacked...), so a
    leftover or mistyped parameter must not turn it on; the user says it."""
    out = []
    for section, (switch, off, how) in SWITCHES.items():
        if getattr(getattr(cfg, section), switch) != off:
            continue
        keys = sorted(k for k in given if k.startswith(section + ".") and k != f"{section}.{switch}")
        if keys:
            what = {"privacy": "this run would have no differential privacy at all",
                    "secagg": "the server would see every client's change",
                    "attack": "no client would attack", "canary": "no canary would be inserted"}[section]
            out.append(f"{', '.join(keys)} {_verb(keys, 'is', 'are')} set but {section}.{switch} = "
                       f"{_toml(off)}: {what}; {how}, or remove {_verb(keys, 'it', 'them')}")
    p, a = cfg.privacy, cfg.attack
    if p.enabled and p.sampling == "poisson" and cfg.federation.selection != "random":
        out.append(f"federation.selection = {_toml(cfg.federation.selection)} does not combine with "
                   f"privacy.sampling = \"poisson\", which draws each round's clients itself (each joins with "
                   f"probability q); remove one")
    if p.enabled and not p.adaptive:
        keys = sorted(f"privacy.{k}" for k in ("target_quantile", "clip_learning_rate", "count_noise")
                      if f"privacy.{k}" in given)
        if keys:
            out.append(f"{', '.join(keys)} {_verb(keys, 'tunes', 'tune')} adaptive clipping, which is off "
                       f"(privacy.adaptive = false): the clipping norm stays privacy.clipping_norm; set "
                       f"privacy.adaptive = true, or remove {_verb(keys, 'it', 'them')}")
    if p.enabled and p.target_epsilon and "privacy.noise_multiplier" in given:
        out.append("privacy.noise_multiplier is set but privacy.target_epsilon chooses the noise instead; keep one")
    if a.kind not in ("none", "backdoor"):
        keys = sorted(f"attack.{k}" for k in ("trigger", "target") if f"attack.{k}" in given)
        if keys:
            out.append(f"{', '.join(keys)} {_verb(keys, 'applies', 'apply')} to attack.kind = \"backdoor\" only; "
                       f"it is {_toml(a.kind)}: remove {_verb(keys, 'it', 'them')}")
    if a.kind == "backdoor" and "attack.factor" in given:
        out.append("attack.factor is not used by attack.kind = \"backdoor\": its strength is attack.boost; "
                   "remove attack.factor")
    fed = cfg.federation
    for key, readers in AGGREGATOR_OPTIONS.items():
        if f"federation.{key}" in given and fed.aggregator not in readers:
            out.append(f"federation.{key} is read by federation.aggregator = {' or '.join(map(_toml, readers))} "
                       f"only; it is {_toml(fed.aggregator)}: remove it, or choose an aggregator that reads it"
                       + (" (the mean tolerates no bad client)" if fed.aggregator == "mean" and
                          key == "assumed_bad_fraction" else ""))
    return out


def _verb(keys: list[str], one: str, many: str) -> str:
    return one if len(keys) == 1 else many


def _toml(v: Any) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else f'"{v}"' if isinstance(v, str) else repr(v)


def planned_round_size(cfg: Config) -> int | None:
    """Clients per round as the config alone fixes it: clients_per_round, or federation.fraction of the
    data.clients a run partitions data.source into; None where only the partition will tell."""
    from fedit.aggregators import round_size

    fed, d = cfg.federation, cfg.data
    if not fed.fraction:
        return fed.clients_per_round
    return None if d.clients_dir or d.by else round_size(fed, d.clients)


def _robust_settings(cfg: Config, problems: list[str], given: set[str] | None) -> Config:
    """federation.assumed_bad_fraction turned into the aggregator's own parameter (kept in the config, so
    the saved config.toml says what ran), then every robust setting that would tolerate no bad client at
    the round's size refused."""
    from fedit import aggregators

    fed, k = cfg.federation, planned_round_size(cfg)
    a, given = fed.assumed_bad_fraction, given or set()
    # the aggregator's own key disagrees with the share when it holds another value than the share sets, and
    # either the user gave it or it is not its default (a saved config holds the value the share set)
    if a and fed.aggregator in ("krum", "multikrum"):
        if k is None:
            problems.append(f"federation.assumed_bad_fraction sets Krum's f from the clients per round, which "
                            f"federation.fraction = {fed.fraction:g} leaves to the partition; set "
                            f"federation.clients_per_round (and fraction = 0), or federation.byzantine_clients")
            return cfg
        f = aggregators.share_of(a, k)
        if fed.byzantine_clients != f and (fed.byzantine_clients or "federation.byzantine_clients" in given):
            problems.append(f"federation.byzantine_clients = {fed.byzantine_clients} and "
                            f"federation.assumed_bad_fraction = {a:g} (f = ⌊{a:g} × {k}⌋ = {f}) disagree; keep one")
            return cfg
        fed = dataclasses.replace(fed, byzantine_clients=f)
    elif a and fed.aggregator == "trimmed_mean":
        if fed.trim_fraction != a and (fed.trim_fraction != _TRIM_DEFAULT or "federation.trim_fraction" in given):
            problems.append(f"federation.trim_fraction = {fed.trim_fraction:g} and federation.assumed_bad_fraction "
                            f"= {a:g} (the trim it sets) disagree; keep one")
            return cfg
        fed = dataclasses.replace(fed, trim_fraction=a)
    if k is not None:
        problems += aggregators.defence_problems(fed, k)
    else:  # the rest is checked when the run knows its clients (aggregators.tolerance)
        problems += aggregators.defence_problems(fed, None)
    return dataclasses.replace(cfg, federation=fed)


def from_dict(raw: dict[str, Any], source: str = "config", given: set[str] | None = None) -> Config:
    """Build a validated Config; unknown keys and bad values are all reported together.

    ``given``: the keys ("section.key") the user set (config.load says which); those that would do
    nothing here are refused too. Without it (Config.replace, a saved config) they are not looked at."""
    from fedit.strategies import STRATEGIES

    problems: list[str] = []
    sections = _sections()
    built: dict[str, Any] = {}
    for name in raw:
        if name not in sections and name != "strategy":
            problems.append(f"unknown section [{name}] in {source}; known sections: {', '.join([*sections, 'strategy'])}")
        elif not isinstance(raw[name], dict):
            problems.append(f"{name} in {source} must be a table of keys, got {raw[name]!r}")
    for name, cls in sections.items():
        table = raw.get(name, {})
        if isinstance(table, dict):
            built[name] = fill(cls, table, name, problems)
    fed = built.get("federation")
    # the chosen strategy, also when another [federation] key is wrong, so its options are checked in this pass
    name = fed.strategy if fed is not None else (raw.get("federation") or {}).get("strategy", "fedavg") \
        if isinstance(raw.get("federation", {}), dict) else None
    if fed is not None and name not in STRATEGIES:
        problems.append(f"federation.strategy = {name!r}: choose one of {', '.join(STRATEGIES)}")
    elif isinstance(name, str) and name in STRATEGIES and isinstance(raw.get("strategy", {}), dict):
        options = STRATEGIES[name].Options
        before = len(problems)
        built["strategy"] = fill(options, raw.get("strategy", {}), "strategy", problems)
        if len(problems) > before and not dataclasses.fields(options):
            problems[-1] += f" (strategy {name} has no options)"
        elif len(problems) > before:
            problems[-1] += f" (the options of strategy {name})"
    if not problems:
        cfg = Config(**built)
        t = cfg.train
        if t.batch_size % t.micro_batch_size:
            problems.append(f"train.batch_size = {t.batch_size} must be a multiple of train.micro_batch_size = "
                            f"{t.micro_batch_size}")
        fed = cfg.federation
        if fed.strategy == "scaffold" and (fed.aggregator != "mean" or fed.max_update_norm):
            problems.append(f"federation.strategy = \"scaffold\" with federation.aggregator = {fed.aggregator!r} "
                            f"and max_update_norm = {fed.max_update_norm:g}: SCAFFOLD's control variates would "
                            f"still be averaged unprotected; use another strategy with a robust aggregator")
        lo = cfg.lora
        if lo.client_ranks and lo.clients_file:
            problems.append("lora.client_ranks and lora.clients_file are both set; keep one")
        hetero = bool(lo.client_ranks or lo.clients_file) or lo.aggregation == "product" or lo.freeze_a
        if hetero and fed.strategy == "scaffold":
            problems.append("federation.strategy = \"scaffold\" keeps full-rank control variates: it does not run "
                            "with lora.client_ranks, lora.clients_file, lora.aggregation = \"product\" or "
                            "lora.freeze_a; use another strategy")
        bad = sorted({r for r in lo.client_ranks if not 1 <= r <= lo.r})
        if bad:  # found here, before any model is loaded (clients_file ranks are checked with the partition)
            problems.append(f"lora.client_ranks holds {bad}: client ranks must be between 1 and the global rank "
                            f"lora.r = {lo.r}; lower them or raise lora.r")
        if bool(lo.client_ranks or lo.clients_file) and fed.aggregator != "mean":
            problems.append(f"federation.aggregator = {fed.aggregator!r} with lora.client_ranks or lora.clients_file: "
                            f"a client's change is zero on the rows and modules it does not hold, so a median, "
                            f"trimmed mean or Krum would keep the rows only high-rank clients hold at zero; use "
                            f"federation.max_update_norm (it bounds each client's change) with aggregator \"mean\"")
        if lo.aggregation == "product":
            lr = getattr(cfg.strategy, "server_learning_rate", 1.0)
            if fed.strategy not in ("fedavg", "fedprox") or lr != 1.0:  # FedProx's server step is FedAvg's
                problems.append(f"lora.aggregation = \"product\" is the mean of the clients' products B·A, not a "
                                f"step on the factors: it runs with federation.strategy = \"fedavg\" or "
                                f"\"fedprox\" at server_learning_rate 1.0 only (got {fed.strategy}"
                                + (f" with server_learning_rate {lr:g})" if fed.strategy in ("fedavg", "fedprox")
                                   else ")"))
            if fed.aggregator != "mean" or fed.max_update_norm:
                problems.append("lora.aggregation = \"product\" averages products: it does not combine with "
                                "federation.aggregator or max_update_norm")
            if lo.freeze_a:
                problems.append("lora.freeze_a already makes averaging the factors exact; use lora.aggregation = "
                                "\"factors\" with it")
        if cfg.privacy.enabled:
            if fed.aggregator != "mean" or fed.max_update_norm:
                problems.append("privacy.enabled clips every update to privacy.clipping_norm and averages them with "
                                "equal weights, which is its sensitivity bound: it does not combine with "
                                "federation.aggregator or max_update_norm")
            if fed.strategy == "scaffold" or lo.aggregation == "product":
                problems.append("privacy.enabled noises the mean of the adapters' changes only: SCAFFOLD's control "
                                "variates and lora.aggregation = \"product\" would bypass it")
        if cfg.secagg.enabled:
            if fed.aggregator != "mean" or fed.max_update_norm:
                problems.append("secagg.enabled: the server sees only the sum of the round's changes, so it cannot "
                                "take a median, choose by Krum or bound single changes; set federation.aggregator = "
                                "\"mean\" and max_update_norm = 0 (privacy.enabled clips on the clients instead)")
            if STRATEGIES[fed.strategy].reply_groups != ("adapter",):
                problems.append(f"secagg.enabled sums the adapters' changes only; strategy {fed.strategy} sends more "
                                f"(its control variates) and does not run with it")
            if hetero:
                problems.append("secagg.enabled sums changes of one shape: it does not run with lora.client_ranks, "
                                "lora.clients_file, lora.aggregation = \"product\" or lora.freeze_a")
            if not fed.fraction and fed.clients_per_round < 3:
                problems.append("secagg.enabled needs federation.clients_per_round >= 3: a sum over one client is "
                                "its change, and Flower's masks come from 32-bit seeds, which a round of two would "
                                "let the server search")
            sa = cfg.secagg
            if sa.modulus_range & (sa.modulus_range - 1) or sa.modulus_range <= 2 * sa.quantization_range:
                problems.append(f"secagg.modulus_range = {sa.modulus_range} must be a power of 2 above 2 × "
                                f"secagg.quantization_range (and above clients per round × quantization_range)")
        if cfg.attack.kind != "none" and not (cfg.attack.clients or cfg.attack.fraction):
            problems.append(f"attack.kind = {cfg.attack.kind!r} names no malicious client; set attack.clients = [ids] "
                            f"or attack.fraction")
        if cfg.attack.boost != 1 and cfg.attack.kind not in ("backdoor", "none"):  # none: unused_settings
            problems.append(f"attack.boost applies to attack.kind = \"backdoor\" only (the other kinds have "
                            f"attack.factor); it is {cfg.attack.kind!r}")
        cfg = _robust_settings(cfg, problems, given)
        fed = cfg.federation
        if given is not None:
            problems += unused_settings(cfg, given)
        validating = bool(cfg.data.client_validation) and cfg.eval.every > 0
        for key, on in (("run.keep_best", cfg.run.keep_best), ("federation.early_stop_patience",
                                                                fed.early_stop_patience)):
            if on and not validating:  # a choice made on the server's test set would be tuning on test
                problems.append(f"{key} chooses rounds on the clients' validation loss: set data.client_validation "
                                f"(e.g. 0.1) and eval.every >= 1; it never chooses on the test set")
        so = cfg.strategy
        if getattr(so, "local_optimizer", "") == "sgd" and not so.local_lr and not t.max_grad_norm:
            problems.append("strategy.local_optimizer = \"sgd\" with strategy.local_lr = 0 derives SGD's rate from "
                            "train.max_grad_norm, which is 0 here; set strategy.local_lr or train.max_grad_norm")
        if cfg.judge.url and not cfg.judge.model:
            problems.append("judge.url is set but judge.model is empty; set judge.model to the judge's model name")
        if cfg.model.quantize != "none" and cfg.model.device == "cpu":
            problems.append("model.quantize needs a CUDA GPU (bitsandbytes); set model.quantize = \"none\" on CPU")
        if not problems:
            return cfg
    raise FeditError(f"{len(problems)} problem(s) in {source}:\n" + "\n".join(f"  - {p}" for p in problems))


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, value); the value is read as TOML, else as a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise FeditError(f"override {text!r} must look like section.key=value, e.g. train.lr=3e-4")
    key, value = text.split("=", 1)
    section, name = key.strip().split(".", 1)
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return section, name, parsed


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
         base: dict[str, dict[str, Any]] | None = None, base_name: str = "defaults") -> Config:
    """``base`` settings (e.g. a reproduce scale), then a TOML file, then key=value overrides;
    everything validated at once."""
    raw: dict[str, Any] = {k: dict(v) for k, v in (base or {}).items()}
    source = base_name
    given: set[str] = set()  # what the user set: every override, and a file's keys at other than their default
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FeditError(f"config file {p} does not exist; pass an existing .toml file or leave --config out")
        try:
            from_file = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise FeditError(f"config file {p} is not valid TOML: {e}") from None
        if not saved_run_config(p):
            given |= _set_in_file(from_file)
        for section, values in from_file.items():
            if isinstance(values, dict) and isinstance(raw.get(section), dict):
                raw[section].update(values)
            else:
                raw[section] = values
        source = str(p) if base is None else f"{base_name} + {p}"
    problems = []
    for text in overrides:
        try:
            section, name, value = parse_override(text)
        except FeditError as e:
            problems.append(str(e))
            continue
        table = raw.setdefault(section, {})
        if isinstance(table, dict):
            table[name] = value
            given.add(f"{section}.{name}")
    if overrides:
        source += " + overrides"
    try:
        cfg = from_dict(raw, source, given)
    except FeditError as e:
        if not problems:
            raise
        problems += [line[4:] for line in str(e).splitlines()[1:]]
    if problems:
        raise FeditError(f"{len(problems)} problem(s) in {source}:\n" + "\n".join(f"  - {p}" for p in problems))
    return cfg


def saved_run_config(path: Path) -> bool:
    """Whether ``path`` is the config.toml a run saved in its directory (every key written, validated
    when the run started): resuming or reading an old run must not be refused for what it says."""
    return path.name == "config.toml" and ((path.parent / "run.json").is_file() or (path.parent / "rounds").is_dir())


def _set_in_file(from_file: dict[str, Any]) -> set[str]:
    """The keys of a config file the user set: those at a value other than their default (a copy of a run's
    config.toml, which writes every key, keeps its defaults without setting them)."""
    out = set()
    for name, cls in _sections().items():
        table = from_file.get(name)
        if not isinstance(table, dict):
            continue
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for key, value in table.items():
            default = defaults.get(key)
            if isinstance(default, tuple) and isinstance(value, list):
                value = tuple(value)
            if key in defaults and value != default:
                out.add(f"{name}.{key}")
    return out


def to_toml(cfg: Config) -> str:
    """Serialise a Config as TOML (the resolved config saved in each run directory)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {fmt(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def describe() -> str:
    """Every key with its default and help, for `fedit run --help-config`; every strategy and its options."""
    from fedit.strategies import STRATEGIES

    out = []
    for name, cls in _sections().items():
        out.append(f"[{name}]")
        out += describe_fields(cls, name)
    out.append("[strategy]   options of the strategy chosen by federation.strategy:")
    for name, cls in STRATEGIES.items():
        doc = " ".join((sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")[0].split())
        out.append(f"  {name}: {doc}")
        out += describe_fields(cls.Options, "strategy", indent="    ") or ["    (no options)"]
    return "\n".join(out)
