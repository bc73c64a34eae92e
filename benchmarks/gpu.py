"""fedit on a GPU: the naive loop vs fedit's client loop vs the GPU's own limit, at 135M and 7B shapes.

    python -m benchmarks.gpu_prepare --out gpu-kit                        # here, once (CPU, ~15 s)
    python -m benchmarks.gpu --kit gpu-kit --out gpu-results              # on the GPU machine (< 8 min on an H200)
    python -m benchmarks.gpu --kit gpu-kit --out /tmp/smoke --smoke       # any CPU: tiny shape, 8 examples

Every case trains the same Dolly records (the kit's, tokenized with the SmolLM2 tokenizer, alpaca
prompt, cutoff 512) with the paper's batch of 32 and LoRA r=8 on all linear layers, on a
random-weight model of a real shape (benchmarks/shapes.py; weights do not change the speed):

- naive: the paper repo's client loop (benchmarks/throughput.naive_loop): a new transformers
  Trainer per client, micro-batches padded to their longest, adapters through torch.save;
  bf16 autocast (the paper ran fp16 AMP on an 8-bit base, which needs bitsandbytes), and
  activation checkpointing where the paper repo's prepare_model_for_int8_training had it (7B);
- fedit: fedit.client.train through benchmarks/throughput.fedit_clients, micro-batches padded
  (fedit's CUDA default) or packed (model.packing = "packed"), checkpointing on or off,
  deterministic kernels on or off (model.deterministic), micro-batches of 8 or 32, peft's LoRA
  layers or fedit's leaner ones from its CPU path ("lean LoRA": no fp32 copy of each layer's
  input, scaling and addition inside the matmul; fedit.cpu_lora.speed_up_lora_on_cpu), 4-bit base weights
  if bitsandbytes imports;
- exactness: one client trained twice from the same adapter and seed, with default and with
  deterministic kernels: are the two adapters the same bits (what --resume can promise)?
- limit: a big bf16 matmul timed with CUDA events, at the start and the end of the run; each
  case's model FLOPs utilization (MFU) is against the higher of the two.

Throughput counts real tokens: every non-padding input token trained once, prompt included
(what the model computes; ``labelled_tokens`` are those the loss reads). Peak memory is
torch.cuda.max_memory_allocated over the case, weights included, reset before each case.

Each case is guarded: an out-of-memory error, any other error, or the time budget ends that case,
is recorded, and the run goes on; results are written after every case, so a run killed from
outside still leaves what it measured. ``--time-budget`` (seconds from the start) skips a case
whose estimate no longer fits and stops one that runs past it.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import platform
import signal
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

STARTED = time.time()  # the log's clock (say); reset by main()
# cuBLAS reads its workspace setting once, at its first call: set it before any, so the deterministic
# case can be measured in the same process; every case then runs with it (32 MiB of workspace).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

from benchmarks import shapes, throughput  # noqa: E402
from fedit.config import TrainConfig  # noqa: E402

TRAIN = TrainConfig()  # fedit's defaults

PAPER_HOURS = 2.0        # the paper (Zhang et al., FedIT): its protocol on one Titan RTX
USERS_A100_HOURS = 13.5  # its users (FederatedGPT-Shepherd issues 2 and 7): the same protocol on an A100
PROJECTED_SHAPE = "llama2-7b"


@dataclass(frozen=True)
class Case:
    shape: str
    loop: str = "fedit"        # "fedit", "naive", or "exactness" (the same client trained twice, compared)
    clients: int = 2           # clients of ``per_client`` examples each
    micro: int = 8             # examples per forward pass (train.micro_batch_size)
    micro_tokens: int = TRAIN.micro_batch_tokens  # tokens per forward pass (train.micro_batch_tokens; 0: no bound)
    packed: bool = False
    checkpointing: bool = False
    deterministic: bool = False
    lean_lora: bool = False    # CUDA: fedit's LoRA layer changes from the CPU path (fedit.cpu_lora.speed_up_lora_on_cpu)
    quantize: str = "none"

    @property
    def name(self) -> str:
        parts = [self.shape, self.loop]
        if self.loop == "fedit":
            bound = f"{self.micro_tokens} tokens" if self.micro_tokens else "no token bound"
            parts.append(f"micro {self.micro} ({bound})")
        elif self.loop == "naive":
            parts.append(f"micro {self.micro}")
        if self.loop == "fedit":
            parts.append("packed" if self.packed else "padded")
        parts += [x for x, on in (("lean LoRA", self.lean_lora), ("checkpointing", self.checkpointing),
                                  ("deterministic", self.deterministic), (self.quantize, self.quantize != "none")) if on]
        return ", ".join(parts)


def cuda_plan() -> list[Case]:
    """The GPU run, most wanted first: if the time budget runs out, the tail is what is lost."""
    s, b = "smollm2-135m", "llama2-7b"
    return [
        Case(s, "naive", clients=8),
        Case(s, clients=8),                               # fedit's defaults on CUDA
        Case(b, clients=2),
        Case(b, clients=2, checkpointing=True),
        Case(b, "naive", clients=2, checkpointing=True),  # the paper repo's int8 preparation turned checkpointing on
        Case(s, clients=8, micro_tokens=0),               # the 1,024-token bound was set for CPU memory
        Case(b, clients=2, micro_tokens=0),
        Case(s, clients=8, packed=True),
        Case(b, clients=2, packed=True),
        Case(b, clients=2, lean_lora=True),
        Case(b, clients=2, packed=True, lean_lora=True, micro_tokens=0),  # everything that might pay, at once
        Case(s, clients=8, lean_lora=True),
        Case(s, clients=8, micro=32, micro_tokens=0),
        Case(b, clients=2, micro_tokens=0, checkpointing=True),
        Case(b, clients=2, micro=32, micro_tokens=0, checkpointing=True),
        Case(s, clients=8, deterministic=True),
        Case(s, "exactness", clients=1),
        Case(b, clients=2, quantize="4bit", checkpointing=True),
    ]


def smoke_plan() -> list[Case]:
    """The same code paths on a CPU in seconds: the tiny shape, 2 clients of 4 examples."""
    t = "tiny"
    return [Case(t, "naive", micro=2), Case(t, micro=2), Case(t, micro=2, packed=True), Case(t, micro=2, micro_tokens=0),
            Case(t, micro=2, checkpointing=True), Case(t, micro=2, deterministic=True),
            Case(t, "exactness", clients=1, micro=2), Case(t, micro=2, quantize="4bit")]


# ---------------------------------------------------------------- measuring

def matmul_peak(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """bf16 FLOP/s of an n x n x n matmul: on CUDA the mean of ``repeats`` timed with CUDA events after
    3 warm-ups; on a CPU the best of ``repeats`` (benchmarks/throughput.matmul_peak)."""
    if device.type != "cuda":
        return throughput.matmul_peak(torch.bfloat16, n=n, repeats=repeats)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    del a, b
    return 2 * n ** 3 * repeats / seconds


def account(model_config, tokens: int, labelled: int, seconds: float, peak_flops: float) -> dict:
    """Throughput and MFU of one measurement: model FLOPs of LoRA training (throughput.train_flops:
    forward + activation gradients, the LM head at labelled positions) over the time, against the peak.
    Recomputation under activation checkpointing is not useful work and is not counted."""
    flops = throughput.train_flops(model_config, tokens, labelled)
    return {"tokens_per_s": tokens / seconds, "model_flops": flops, "achieved_flops_per_s": flops / seconds,
            "peak_flops_per_s": peak_flops, "mfu": flops / seconds / peak_flops}


def project(protocol_tokens: float, tokens_per_s: float) -> float:
    """Hours of local training for the protocol's real tokens at a measured throughput."""
    return protocol_tokens / tokens_per_s / 3600


def for_vocab(examples: list, vocab: int) -> list:
    """The kit's token ids folded into a smaller vocabulary (the 7B shape's 32,000): the same lengths
    and labelled positions, so the same work; which ids they are does not change the speed."""
    from fedit.data.batches import IGNORE, Example

    if max(max(e.input_ids) for e in examples) < vocab:
        return examples
    return [Example([t % vocab for t in e.input_ids], [t if t == IGNORE else t % vocab for t in e.labels],
                    e.category) for e in examples]


class Budget:
    """Seconds left of ``--time-budget``, counted from the bench's start (this object's creation); a case that outlasts them is
    stopped by SIGALRM (a TimeoutError inside the case, recorded like any other failure)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.started = time.time()  # not the import: a test session may have imported this module long before

    def left(self) -> float:
        return self.seconds - (time.time() - self.started)

    def __enter__(self):
        if hasattr(signal, "SIGALRM"):
            signal.signal(signal.SIGALRM, self._stop)
            signal.alarm(max(1, math.ceil(self.left())))
        return self

    def __exit__(self, *exc):
        if hasattr(signal, "SIGALRM"):
            signal.alarm(0)

    @staticmethod
    def _stop(signum, frame):
        raise TimeoutError("the time budget ran out during this case")


# ---------------------------------------------------------------- the run

class Bench:
    def __init__(self, kit: Path, out: Path, device: str, smoke: bool, budget: float, batch_size: int,
                 per_client: int, peak_n: int, lr: float = 1.5e-4):
        from transformers import AutoTokenizer

        from fedit.data.batches import tokenize
        from fedit.data.records import load_records
        from fedit.device import resolve_dtype

        self.kit, self.out = Path(kit), Path(out)
        self.device = torch.device(device)
        self.dtype = resolve_dtype("auto", self.device)  # bf16 on CUDA, as fedit chooses it
        self.smoke, self.budget = smoke, Budget(budget)
        self.batch_size, self.per_client, self.peak_n, self.lr = batch_size, per_client, peak_n, lr
        self.tokenizer = AutoTokenizer.from_pretrained(self.kit / "tokenizer")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.kit_meta = json.loads((self.kit / "kit.json").read_text())
        records = load_records(str(self.kit / "dolly.jsonl")).records
        self.examples = tokenize(records, self.tokenizer, 512)
        self.bases: dict[str, torch.nn.Module] = {}
        self.result: dict = {"machine": machine(self.device), "started": time.strftime("%Y-%m-%d %H:%M %Z"),
                             "smoke": smoke, "dtype": str(self.dtype).replace("torch.", ""),
                             "workload": {"batch_size": batch_size, "examples_per_client": per_client, "cutoff": 512,
                                          "lora": "r=8, alpha 16, dropout 0.05, all linear layers",
                                          "kit_records": len(records)},
                             "cases": []}

    # -- models

    def base(self, shape: str):
        """A random-weight model of ``shape`` on the device, built once and reused by every case of it."""
        if shape not in self.bases:
            for other in list(self.bases):  # one big model at a time on the device
                if other != shape and shapes.param_count(shapes.llama_config(other)) > 1e9:
                    self.drop(other)
            t = time.perf_counter()
            self.bases[shape] = shapes.build(shape, self.device, self.dtype)
            self.result.setdefault("build_seconds", {})[shape] = time.perf_counter() - t
        return self.bases[shape]

    def drop(self, shape: str) -> None:
        self.bases.pop(shape, None)
        free(self.device)

    def case_examples(self, case: Case) -> list[list]:
        exs = for_vocab(self.examples[:case.clients * self.per_client], shapes.SHAPES[case.shape]["vocab_size"])
        return [exs[i * self.per_client:(i + 1) * self.per_client] for i in range(case.clients)]

    def loaded(self, case: Case, base):
        """``base`` prepared as fedit's load_base prepares a loaded model, with the case's options, and LoRA."""
        from fedit.config import LoraConfig, ModelConfig
        from fedit.model import attach_lora, prepare

        cfg = ModelConfig(device=self.device.type, gradient_checkpointing=case.checkpointing,
                          packing="packed" if case.packed else "padded", deterministic=case.deterministic)
        loaded = prepare(base, self.tokenizer, cfg, self.device, self.dtype, source=f"random weights, {case.shape}")
        if case.deterministic:  # load_base applies it on CUDA only; here the CPU smoke run exercises it too
            from fedit.model import use_deterministic

            use_deterministic(True)
        attach_lora(loaded, LoraConfig(), seed=0)
        if case.lean_lora and self.device.type == "cuda":  # on a CPU attach_lora already did this
            from fedit.cpu_lora import speed_up_lora_on_cpu

            speed_up_lora_on_cpu(loaded, fast_dropout=False)
        return loaded

    def release(self, loaded, case: Case) -> None:
        """The base model back as it was: no LoRA, no checkpointing, the default attention and kernels."""
        from fedit.model import set_checkpointing, use_deterministic

        base = loaded.model.unload()
        if case.checkpointing:
            set_checkpointing(base, False)
        if base.config._attn_implementation != "sdpa":
            base.set_attn_implementation("sdpa")
        if case.deterministic:
            use_deterministic(False)

    # -- cases

    def estimate(self, case: Case) -> float:
        """Seconds a case should take at worst: model build (if not built), plus training at a pessimistic
        5% MFU (naive) or 10% (fedit), twice over for the exactness case's four trainings of one client."""
        cfg = shapes.llama_config(case.shape)
        tokens = sum(len(e.input_ids) for c in self.case_examples(case) for e in c)
        train = throughput.train_flops(cfg, tokens, tokens) / (self.peak * (0.05 if case.loop == "naive" else 0.1))
        build = 0.0 if case.shape in self.bases else 2e-9 * shapes.param_count(cfg) + 3
        if case.quantize != "none":
            build += 4e-9 * shapes.param_count(cfg) * 2 + 20  # a bf16 copy to disk and a quantizing load
        return 5 + build + (4 if case.loop == "exactness" else 1) * train

    def run_case(self, case: Case) -> dict:
        row: dict = {"case": case.name, **asdict(case)}
        if case.quantize != "none":
            why = quantize_unavailable(self.device)
            if why:
                return {**row, "status": "not available", "why": why}
        row["estimate_s"] = round(self.estimate(case), 1)
        if row["estimate_s"] > self.budget.left():
            return {**row, "status": "skipped", "why": f"time budget: estimated {row['estimate_s']:.0f} s, "
                                                        f"{self.budget.left():.0f} s left"}
        t = time.perf_counter()
        try:
            with self.budget:
                if case.loop == "exactness":
                    row.update(self.exactness(case))
                elif case.quantize != "none":
                    row.update(self.quantized(case))
                else:
                    row.update(self.throughput(case))
            row["status"] = "ok"
        except torch.cuda.OutOfMemoryError as e:
            row.update(status="oom", why=str(e).splitlines()[0][:300])
        except Exception as e:  # noqa: BLE001 -- one failure is recorded, the run goes on
            row.update(status="error", why=f"{type(e).__name__}: {e}"[:500],
                       traceback=traceback.format_exc()[-2000:])
        if row["status"] != "ok":
            # Out here, not in the except blocks: the exception's frames hold the failed case's
            # tensors until its block ends. The model may be left half-wrapped: built anew if needed.
            self.drop(case.shape)
            torch.use_deterministic_algorithms(False)
        row["wall_s"] = round(time.perf_counter() - t, 1)
        return row

    def throughput(self, case: Case) -> dict:
        base = self.base(case.shape)
        clients = self.case_examples(case)
        reset_peak(self.device)
        if case.loop == "naive":
            from fedit.config import LoraConfig

            r = throughput.naive_loop(base, self.tokenizer, clients, self.batch_size, case.micro, self.lr, LoraConfig(),
                                      bf16=self.device.type == "cuda", checkpointing=case.checkpointing, warmup=True)
            r["labelled_tokens"] = sum(e.trained_tokens for c in clients for e in c)
        else:
            loaded = self.loaded(case, base)
            try:
                r = throughput.fedit_clients(loaded, clients, self.batch_size, case.micro, self.lr, case.micro_tokens)
            finally:
                self.release(loaded, case)
        r["peak_memory_gb"] = peak_gb(self.device)
        r["examples"] = sum(len(c) for c in clients)
        return {**r, **account(base.config, r["tokens"], r["labelled_tokens"], r["train_seconds"], self.peak)}

    def quantized(self, case: Case) -> dict:
        """4-bit base weights through fedit's own load_base: the random model saved once, loaded quantized."""
        import tempfile

        from fedit.config import LoraConfig, ModelConfig
        from fedit.model import attach_lora, load_base

        clients = self.case_examples(case)
        with tempfile.TemporaryDirectory() as tmp:
            model = self.base(case.shape)
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            self.drop(case.shape)
            del model
            free(self.device)
            loaded = load_base(ModelConfig(name=tmp, device="cuda", quantize=case.quantize,
                                           gradient_checkpointing=case.checkpointing))
        attach_lora(loaded, LoraConfig(), seed=0)
        reset_peak(self.device)
        r = throughput.fedit_clients(loaded, clients, self.batch_size, case.micro, self.lr, case.micro_tokens)
        r["peak_memory_gb"] = peak_gb(self.device)
        config = loaded.model.get_base_model().config
        del loaded
        free(self.device)
        return {**r, **account(config, r["tokens"], r["labelled_tokens"], r["train_seconds"], self.peak)}

    def exactness(self, case: Case) -> dict:
        """What --resume can promise: one client trained twice from the same adapter and seed, with the
        default kernels and with deterministic ones; are the two adapters the same bits?"""
        from fedit import client
        from fedit.config import TrainConfig
        from fedit.protocol import GLOBAL, FitIns

        base = self.base(case.shape)
        exs = self.case_examples(case)[0]
        cfg = TrainConfig(lr=self.lr, batch_size=self.batch_size, micro_batch_size=case.micro,
                          micro_batch_tokens=case.micro_tokens)
        out = {}
        for deterministic in (False, True):
            c = replace(case, deterministic=deterministic)
            adapters = []
            for _ in range(2):
                loaded = self.loaded(c, base)
                try:
                    update, _ = client.train(loaded, FitIns(1, 0, {GLOBAL: loaded.initial_adapter}), exs, cfg, seed=0)
                finally:
                    self.release(loaded, c)
                adapters.append(update.adapter)
            a, b = adapters
            out["deterministic" if deterministic else "default"] = {
                "bit_identical": all(torch.equal(a[k], b[k]) for k in a),
                "max_abs_diff": max(float((a[k] - b[k]).abs().max()) for k in a)}
        return out

    # -- the whole run

    def run(self, plan: list[Case]) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        say(f"{self.result['machine']}; {len(self.examples)} kit examples; budget {self.budget.seconds:.0f} s")
        self.peak = matmul_peak(self.device, self.peak_n)
        self.result["peak_flops"] = {"start": self.peak, "matmul_n": self.peak_n}
        say(f"bf16 matmul peak {self.peak / 1e12:.1f} TFLOP/s")
        for case in plan:
            say(f"{case.name} ...")
            row = self.run_case(case)
            self.result["cases"].append(row)
            say(f"  {row['status']}" + (f": {row['tokens_per_s']:,.0f} real tokens/s, MFU {100 * row['mfu']:.1f}%, "
                                        f"peak {gb(row['peak_memory_gb'])}" if "tokens_per_s" in row else "")
                + (f" ({row['why']})" if "why" in row else ""))
            self.write()
        self.bases.clear()
        free(self.device)
        end = matmul_peak(self.device, self.peak_n)
        self.result["peak_flops"]["end"] = end
        if end > self.peak:  # MFU against the higher of the two peaks: never flattering
            self.peak = end
            for row in self.result["cases"]:
                if "model_flops" in row:
                    row.update(account_again(row, end))
        self.result["peak_flops"]["used"] = self.peak
        self.result["summary"] = summarize(self.result["cases"], self.kit_meta.get("protocol"),
                                           "tiny" if self.smoke else PROJECTED_SHAPE)
        self.result["seconds"] = time.time() - STARTED
        self.write()
        return self.result

    def write(self) -> None:
        (self.out / "gpu.json").write_text(json.dumps(self.result, indent=2))
        (self.out / "gpu.md").write_text(table(self.result))


def account_again(row: dict, peak: float) -> dict:
    return {"peak_flops_per_s": peak, "mfu": row["achieved_flops_per_s"] / peak}


def quantize_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "4-bit base weights need CUDA (bitsandbytes)"
    try:
        importlib.import_module("bitsandbytes")
    except Exception as e:  # noqa: BLE001 -- not installed, or installed without its CUDA library
        return f"bitsandbytes is not importable ({type(e).__name__}: {e})"[:300]
    return None


# option: (the value whose effect is measured, the value of the case it is compared with)
EFFECTS = {"packed": (True, False), "checkpointing": (True, False), "deterministic": (True, False),
           "lean_lora": (True, False), "micro": (32, 8), "micro_tokens": (0, TRAIN.micro_batch_tokens)}
OPTIONS = ("shape", "loop", "micro", "micro_tokens", "packed", "checkpointing", "deterministic", "lean_lora",
           "quantize")


def summarize(cases: list[dict], protocol: dict | None, projected_shape: str) -> dict:
    """The ratios the issue asks for, each between two cases of the same run that differ in one option
    only, and the protocol's time projected from the measured throughput."""
    ok = [c for c in cases if c.get("status") == "ok" and "tokens_per_s" in c]

    def partner(case: dict, **change) -> dict | None:
        want = {k: change.get(k, case[k]) for k in OPTIONS}
        return next((c for c in ok if all(c[k] == v for k, v in want.items())), None)

    def best(shape: str, loop: str, **where) -> dict | None:
        rows = [c for c in ok if c["shape"] == shape and c["loop"] == loop and c["quantize"] == "none"
                and not c["deterministic"] and all(c[k] == v for k, v in where.items())]
        return max(rows, key=lambda c: c["tokens_per_s"]) if rows else None

    def ratio(a: dict, b: dict) -> dict:
        return {"ratio": a["tokens_per_s"] / b["tokens_per_s"], "of": a["case"], "over": b["case"]}

    effects = []  # one option changed, everything else the same
    for c in ok:
        for option, (value, against) in EFFECTS.items():
            if c["loop"] == "fedit" and c[option] == value:
                other = partner(c, **{option: against})
                if other:
                    effects.append({"effect": option, **ratio(c, other)})
    out: dict = {"effects": effects, "fedit_over_naive": []}
    for naive in [c for c in ok if c["loop"] == "naive"]:
        fedit = best(naive["shape"], "fedit")
        same = best(naive["shape"], "fedit", checkpointing=naive["checkpointing"], micro=naive["micro"])
        out["fedit_over_naive"].append({"shape": naive["shape"], "best": ratio(fedit, naive) if fedit else None,
                                        "same_checkpointing_and_micro": ratio(same, naive) if same else None})
    if protocol:
        tokens = protocol["expected_tokens"]
        p = {"protocol_tokens": tokens, "shape": projected_shape, "paper_hours": PAPER_HOURS,
             "paper_hardware": "one Titan RTX", "users_a100_hours": USERS_A100_HOURS,
             "tokens_source": "expected real tokens of the paper's protocol (20 rounds x 5 of 100 clients x 1 epoch "
                              "= every training record once in expectation), SmolLM2 tokenizer, cutoff 512; from the "
                              "whole of Dolly at kit preparation (kit.json)",
             "scope": "local training only: no evaluation, model loading or aggregation"}
        for loop in ("fedit", "naive"):
            row = best(projected_shape, loop)
            if row:
                p[f"{loop}_hours"] = project(tokens, row["tokens_per_s"])
                p[f"{loop}_case"] = row["case"]
        out["projection"] = p
    return out


# ---------------------------------------------------------------- report

def table(r: dict) -> str:
    w = r["workload"]
    peak = r.get("peak_flops", {})
    peaks = " / ".join(f"{peak[k] / 1e12:.1f}" for k in ("start", "end") if k in peak)
    lines = [f"Machine: {r['machine']}. {r['started']}." + (" SMOKE RUN (tiny shape on CPU): not a measurement."
                                                          if r.get("smoke") else ""), "",
             f"Workload: Dolly records from the kit, SmolLM2 tokenizer, cutoff {w['cutoff']}, batch {w['batch_size']}, "
             f"{w['examples_per_client']} examples per client, LoRA {w['lora']}; random weights of the named shape, "
             f"{r['dtype']}. bf16 matmul peak (start / end of run): {peaks} TFLOP/s.", "",
             "| case | real tokens/s | MFU | peak memory | status |", "| --- | --- | --- | --- | --- |"]
    for c in r["cases"]:
        if "tokens_per_s" in c:
            lines.append(f"| {c['case']} | {c['tokens_per_s']:,.0f} | {100 * c['mfu']:.1f}% | "
                         f"{gb(c['peak_memory_gb'])} | ok ({c['tokens']:,.0f} tokens in {c['train_seconds']:.2f} s) |")
        elif c.get("loop") == "exactness" and c.get("status") == "ok":
            d, e = c["default"], c["deterministic"]
            lines.append(f"| {c['case']}: same client twice | | | | default kernels: "
                         f"{'bit-identical' if d['bit_identical'] else 'differ by %.2g' % d['max_abs_diff']}; "
                         f"deterministic: {'bit-identical' if e['bit_identical'] else 'differ by %.2g' % e['max_abs_diff']} |")
        else:
            lines.append(f"| {c['case']} | | | | {c.get('status')}: {c.get('why', '')} |")
    s = r.get("summary")
    if s:
        lines += ["", "| ratio of real tokens/s, same run | value |", "| --- | --- |"]
        for x in s["fedit_over_naive"]:
            for key, label in (("best", "fastest fedit case"), ("same_checkpointing_and_micro",
                                                                   "fedit with the same checkpointing and micro-batch")):
                if x[key]:
                    lines.append(f"| {x['shape']}: {label} / naive | {x[key]['ratio']:.2f}x |")
        label = {"packed": "packed / padded micro-batches", "checkpointing": "with / without activation checkpointing",
                 "deterministic": "deterministic / default kernels", "micro": "micro-batches of 32 / of 8",
                 "lean_lora": "lean LoRA layers / peft's",
                 "micro_tokens": f"no token bound / {TRAIN.micro_batch_tokens} tokens per micro-batch"}
        for e in s["effects"]:
            lines.append(f"| {label[e['effect']]}: {e['of']} | {e['ratio']:.2f}x |")
        p = s.get("projection")
        if p:
            lines += ["", f"The paper's protocol, {p['protocol_tokens'] / 1e6:.2f} M real tokens of local training "
                          f"({p['scope']}), at the measured {p['shape']} throughput:", ""]
            for loop in ("fedit", "naive"):
                if f"{loop}_hours" in p:
                    lines.append(f"- {loop} ({p[f'{loop}_case']}): **{p[f'{loop}_hours'] * 60:.1f} minutes**")
            lines.append(f"- the paper: {p['paper_hours']:g} hours ({p['paper_hardware']}); its users: "
                         f"{p['users_a100_hours']:g} hours on an A100")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the device

def machine(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return (f"{p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}, "
                f"transformers {transformers_version()}")
    return f"{platform.processor() or platform.machine()} CPU, torch {torch.__version__}, " \
           f"transformers {transformers_version()}"


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def gb(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f} GB"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def say(text: str) -> None:
    print(f"[{time.time() - STARTED:6.1f} s] {text}", flush=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="fedit on a GPU: naive loop vs fedit vs the matmul peak, 135M and 7B shapes")
    p.add_argument("--kit", default="gpu-kit", help="folder written by `python -m benchmarks.gpu_prepare`")
    p.add_argument("--out", default="gpu-results", help="folder for gpu.json and gpu.md")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default: cuda (cpu with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny shape, 2 clients x 4 examples, batch 4: checks the "
                                                        "script end to end on any CPU in seconds")
    p.add_argument("--time-budget", type=float, default=420.0,
                   help="seconds from the start; a case whose estimate no longer fits is skipped, one running past "
                        "it is stopped (default 420)")
    a = p.parse_args(argv)
    global STARTED
    STARTED = time.time()  # the log's clock starts with the run
    device = a.device or ("cpu" if a.smoke else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible; run with --smoke (or --device cpu) on a CPU")
    if a.smoke:
        bench = Bench(a.kit, a.out, device, True, a.time_budget, batch_size=4, per_client=4, peak_n=256)
        return bench.run(smoke_plan())
    bench = Bench(a.kit, a.out, device, False, a.time_budget, batch_size=32, per_client=64, peak_n=8192)
    return bench.run(cuda_plan())


if __name__ == "__main__":
    main()
