"""The round around the clients: its overhead, memory with many clients, aggregation, bytes on the wire.

Each measurement that reports a peak RSS runs in a child process of its own, so the
high-water mark belongs to that measurement alone. It is read from VmHWM in
/proc/self/status, which starts afresh at exec; getrusage's ru_maxrss does not (Linux
carries it across exec, so a child would report the parent's peak).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from benchmarks.throughput import DOLLY


PEAK_RSS = """
def peak_rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""


def in_child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (with ``peak_rss_mb()``); it prints one JSON object on its last line."""
    out = subprocess.run([sys.executable, "-c", PEAK_RSS + textwrap.dedent(code)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def partition(out: Path, clients: int, scheme: str = "iid", seed: int = 0, data: str = DOLLY) -> Path:
    from fedit.data import partition as part
    from fedit.data.records import load_records

    if (out / "manifest.json").exists():
        return out
    loaded = load_records(data)
    sp = part.split(loaded.records, clients, scheme, alpha=0.5, seed=seed, test_per_category=10)
    part.write(out, loaded, sp, scheme=scheme, seed=seed, alpha=0.5, test_per_category=10)
    return out


def run_in_child(clients_dir: Path, out: Path, overrides: list[str]) -> dict:
    """A `fedit run` in a fresh process: its round rows and its peak RSS."""
    shutil.rmtree(out, ignore_errors=True)  # the previous bench's run: `fedit run` will not write over a run
    return in_child(f"""
        import json
        from fedit import config, runner, server
        cfg = config.load(None, {[f"data.clients_dir={clients_dir}", f"run.out={out}", "run.progress=false"] + overrides!r})
        run_dir = runner.run(cfg)
        rows = server.RunDir(run_dir).events()
        print(json.dumps({{"rows": rows, "peak_rss_mb": peak_rss_mb()}}))
    """)


def round_overhead(work: Path, rounds: int = 3, clients_per_round: int = 5, steps: int = 1) -> dict:
    """Share of a round's wall time outside client training (selection, data loading, adapter
    swap, update checks, aggregation, checkpoint); evaluation is timed and listed apart."""
    parts = partition(work / "dolly-100", 100)
    res = run_in_child(parts, work / "overhead-run", [
        f"federation.rounds={rounds}", f"federation.clients_per_round={clients_per_round}",
        f"train.max_steps={steps}", "eval.every=0"])
    rows = res["rows"]
    out = []
    for r in [x for x in rows if x.get("event") == "round" and x["round"] > 0]:
        train = sum(c["metrics"]["seconds"] for c in rows if c.get("event") == "client" and c["round"] == r["round"])
        out.append({"round": r["round"], "round_seconds": r["seconds"], "client_train_seconds": train,
                    "overhead_seconds": r["seconds"] - train})
    total = sum(o["round_seconds"] for o in out)
    overhead = sum(o["overhead_seconds"] for o in out)
    return {"rounds": out, "overhead_share": overhead / total, "clients_per_round": clients_per_round,
            "steps_per_client": steps, "peak_rss_mb": res["peak_rss_mb"]}


def protocol(work: Path, rounds: int = 1, model: str | None = None, data: str = DOLLY, clients: int = 100,
             overrides: list[str] = (), name: str = "protocol-run") -> dict:
    """The paper's Section 3.1 protocol, `fedit run`'s defaults on a Dirichlet partition of
    ``clients`` clients (100, alpha 0.5, seed 42: as the README's main command draws it), cut to its first
    ``rounds`` rounds; the whole protocol is projected from them: training seconds per record
    times every training record, plus the rest of a round (evaluation, checkpoint) per round."""
    from fedit import config
    from fedit.config import FederationConfig

    paper = FederationConfig()
    parts = partition(work / f"dolly-{clients}-dirichlet", clients, "dirichlet", seed=42, data=data)
    t = time.perf_counter()
    res = run_in_child(parts, work / name,
                       [f"federation.rounds={rounds}", *overrides] + ([f"model.name={model}"] if model else []))
    wall = time.perf_counter() - t
    rows = res["rows"]
    done = [r for r in rows if r.get("event") == "round" and r["round"] > 0]
    clients_rows = [c for c in rows if c.get("event") == "client"]
    trained = sum(c["num_examples"] for c in clients_rows)
    tokens = sum(c["metrics"]["trained_tokens"] for c in clients_rows)
    client_seconds = sum(c["metrics"]["seconds"] for c in clients_rows)
    records = sum(c["examples"] for c in json.loads((parts / "manifest.json").read_text())["clients"])
    train = sum(r["train_seconds"] for r in done)
    rest = sum(r["seconds"] - r["train_seconds"] for r in done)
    return {"rounds": len(done), "of_rounds": paper.rounds, "clients": clients, "clients_per_round": paper.clients_per_round,
            "records_trained": trained, "records": records, "train_seconds": train, "rest_seconds": rest,
            "wall_seconds": wall, "peak_rss_mb": res["peak_rss_mb"], "overrides": list(overrides),
            "micro_batch_tokens": config.load(work / name / "config.toml").train.micro_batch_tokens,
            "tokens_per_s": tokens / client_seconds,
            "projected_hours": (train * records / trained + rest * paper.rounds / len(done)) / 3600}


def evaluation_cost(work: Path) -> dict:
    """Held-out loss of the global adapter on the 80 test records, as each round does by default."""
    parts = partition(work / "dolly-100", 100)
    res = run_in_child(parts, work / "eval-run", ["federation.rounds=1", "federation.clients_per_round=1",
                                                  "train.max_steps=1"])
    r1 = [x for x in res["rows"] if x.get("event") == "round" and x["round"] == 1][0]
    return {"eval_seconds": r1["eval_seconds"], "round_seconds": r1["seconds"]}


def memory_vs_clients(work: Path, counts: tuple[int, ...] = (10, 1000)) -> dict:
    """Peak RSS of the same 1-round run (5 clients, 1 step each) with 10 vs 1,000 registered clients."""
    out = {}
    for n in counts:
        parts = partition(work / f"dolly-{n}", n)
        res = run_in_child(parts, work / f"mem-run-{n}", [
            "federation.rounds=1", "federation.clients_per_round=5", "train.max_steps=1", "train.batch_size=8",
            "eval.every=0"])
        out[str(n)] = res["peak_rss_mb"]
    lo, hi = out[str(counts[0])], out[str(counts[-1])]
    return {"peak_rss_mb": out, "ratio": hi / lo}


def aggregation(adapter_file: Path, n: int = 100) -> dict:
    """Time and peak memory of FedAvg over ``n`` client adapters of the real adapter's shapes,
    streamed one at a time as the in-process runtime delivers them."""
    return in_child(f"""
        import json, time, torch
        from safetensors.torch import load_file
        from fedit.protocol import Update
        from fedit.strategies.fedavg import FedAvg
        g = load_file({str(adapter_file)!r})
        adapter_mb = sum(v.numel() * v.element_size() for v in g.values()) / 2**20
        def updates():
            for i in range({n}):
                yield Update(i, {{"adapter": {{k: v + i for k, v in g.items()}}}}, 100 + i)
        t = time.perf_counter(); sum(1 for _ in updates()); make = time.perf_counter() - t
        base = peak_rss_mb()
        t = time.perf_counter(); new, used = FedAvg().aggregate(1, g, updates()); total = time.perf_counter() - t
        peak = peak_rss_mb()
        print(json.dumps({{"clients": used, "seconds": total - make, "seconds_with_update_creation": total,
                          "adapter_mb": adapter_mb, "peak_rss_increase_mb": peak - base}}))
    """)


def communication(adapter_dir: Path, model_dir: str | None = None) -> dict:
    """Bytes a client receives (global adapter) and sends (its adapter + example count) per round."""
    from safetensors.torch import load_file, save

    sd = load_file(adapter_dir / "adapter_model.safetensors")
    payload = len(save(sd))
    params = sum(v.numel() for v in sd.values())
    return {"adapter_params": params, "bytes_down": payload, "bytes_up": payload + 8,
            "note": "fp32 safetensors payload; transport framing not included"}
