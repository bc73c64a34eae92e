"""`fedit bench`: every performance measurement in one run, as JSON and a markdown table.

    fedit bench --out bench-results          # ~45 minutes on 2 CPU cores (its protocol round twice: with and without the token bound)
    fedit bench --quick --out bench-results  # fewer examples, no 1,000-client run, no protocol round
    fedit bench --protocol-rounds 20         # and the paper's whole protocol, twice (hours)

Ratios are the point: the naive loop and fedit are measured in the same run on the
same examples. Absolute figures depend on the machine, which the report names.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from benchmarks import lowrank, rounds


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def run(out: Path, quick: bool = False, model: str | None = None, skip_naive: bool = False,
        protocol_rounds: int | None = None, console=None) -> dict:
    from fedit.config import DEFAULT_MODEL

    model = model or DEFAULT_MODEL
    out.mkdir(parents=True, exist_ok=True)
    say = console.print if console else print
    res: dict = {"machine": machine(), "model": model, "started": time.strftime("%Y-%m-%d %H:%M"), "quick": quick}

    say("throughput: naive loop vs fedit vs matmul peak ...")
    # In a child process: the naive fp32 loop peaks at many GB, which the allocator keeps
    # after it returns, and the measurements below start children of their own.
    res["throughput"] = rounds.in_child(f"""
        import json
        from benchmarks import throughput
        print(json.dumps(throughput.run({model!r}, n_clients={1 if quick else 2}, per_client={16 if quick else 32},
                                        skip_naive={skip_naive!r}, repeats={1 if quick else 2})))
    """)
    say("round overhead ...")
    res["round_overhead"] = rounds.round_overhead(out / "work", rounds=2 if quick else 3)
    res["evaluation"] = rounds.evaluation_cost(out / "work")
    adapter = out / "work" / "overhead-run" / "adapter"
    say("aggregation of 100 adapters ...")
    res["aggregation"] = rounds.aggregation(adapter / "adapter_model.safetensors")
    res["communication"] = rounds.communication(adapter)
    say("product aggregation of mixed-rank adapters, dense vs QR ...")
    res["product_aggregation"] = lowrank.run(quick)
    say("memory with 10 vs 1,000 registered clients ...")
    res["memory"] = rounds.memory_vs_clients(out / "work", (10, 100) if quick else (10, 1000))
    protocol_rounds = (0 if quick else 1) if protocol_rounds is None else protocol_rounds
    if protocol_rounds:
        say(f"the paper's protocol, {protocol_rounds} round(s) ...")
        res["protocol"] = rounds.protocol(out / "work", protocol_rounds, model=model)
        say("the same round(s) without the micro-batch token budget ...")
        res["protocol_no_budget"] = rounds.protocol(out / "work", protocol_rounds, model=model,
                                                    overrides=["train.micro_batch_tokens=0"],
                                                    name="protocol-run-no-budget")
    (out / "bench.json").write_text(json.dumps(res, indent=2))
    (out / "bench.md").write_text(table(res))
    say(table(res))
    return res


def table(r: dict) -> str:
    t = r["throughput"]
    f, peak = t["fedit"], t["peak_flops"]
    w = t["workload"]
    lines = [f"Machine: {r['machine']}. Model: {r['model']}. {r['started']}.", "",
             f"Workload: {w['clients']} client(s) x {w['examples_per_client']} Dolly examples, cutoff {w['cutoff']}, "
             f"batch {w['batch_size']} (micro-batches of {w['micro_batch_size']}), LoRA r=8 on all linear layers; "
             f"{w['real_tokens']} real tokens ({w['padded_tokens_naive']} with the naive padding). "
             f"Throughput: best of {w.get('repeats', 1)} alternating repetitions per side.", "",
             "| measurement | value |", "| --- | --- |"]
    if "naive" in t:
        n = t["naive"]
        lines.append(f"| naive loop (new Trainer per client, fp32, pad to longest, torch.save) | "
                     f"{n['tokens_per_s']:.0f} real tokens/s |")
    batches = "packed" if t.get("packed") else "padded"
    lines.append(f"| fedit client loop ({t['fedit_dtype']}, attention {t.get('attention', 'sdpa')}, {batches} batches) | "
                 f"{f['tokens_per_s']:.0f} real tokens/s |")
    if "fedit_padded" in t:
        lines.append(f"| fedit client loop with padded micro-batches instead | "
                     f"{t['fedit_padded']['tokens_per_s']:.0f} real tokens/s (packing: {t['packing_speedup']:.2f}x) |")
    if "speedup" in t:
        lines.append(f"| fedit / naive | {t['speedup']:.2f}x |")
    each = ", ".join(f"{x / 1e12:.2f}" for x in peak["bf16_all"])
    mfus = ", ".join(f"{100 * x:.1f}%" for x in f["all_mfu_bf16"])
    lines += [f"| matmul peak bf16 (after each fedit repetition) / fp32 | {each} / {peak['fp32'] / 1e12:.2f} TFLOP/s |",
              f"| fedit MFU (model FLOPs / the bf16 peak measured right after the same repetition) | "
              f"{100 * f['mfu_bf16']:.1f}% in the fastest repetition (all: {mfus}) |"]
    o = r["round_overhead"]
    lines.append(f"| round overhead outside client training ({o['clients_per_round']} clients x "
                 f"{o['steps_per_client']} step, evaluation excluded) | {100 * o['overhead_share']:.2f}% of the round |")
    e = r["evaluation"]
    lines.append(f"| held-out evaluation (80 records), listed apart | {e['eval_seconds']:.1f} s per round |")
    a = r["aggregation"]
    lines.append(f"| FedAvg of {a['clients']} adapters ({a['adapter_mb']:.1f} MB each) | {a['seconds']:.2f} s, "
                 f"peak RSS +{a['peak_rss_increase_mb']:.0f} MB |")
    if "product_aggregation" in r:
        lines += lowrank.rows(r["product_aggregation"])
    m = r["memory"]
    (lo, v_lo), (hi, v_hi) = list(m["peak_rss_mb"].items())
    lines.append(f"| peak RSS, {lo} vs {hi} registered clients (5 per round) | {v_lo:.0f} vs {v_hi:.0f} MB "
                 f"({100 * (m['ratio'] - 1):+.1f}%) |")
    c = r["communication"]
    lines.append(f"| bytes per client and round | {c['bytes_down'] / 2**20:.1f} MB down, "
                 f"{c['bytes_up'] / 2**20:.1f} MB up ({c['adapter_params']:,} adapter parameters) |")
    if "protocol" in r:
        p = r["protocol"]
        whole = "whole protocol" if p["rounds"] == p["of_rounds"] else "whole protocol projected"
        lines.append(f"| the paper's protocol ({p['clients_per_round']} of {p['clients']} Dirichlet clients per round, "
                     f"1 epoch), {p['rounds']} of {p['of_rounds']} rounds: {p['records_trained']:,} of "
                     f"{p['records']:,} records | {p['train_seconds']:.0f} s training + {p['rest_seconds']:.0f} s "
                     f"evaluation and checkpoints, peak RSS {p['peak_rss_mb']:,.0f} MB; {whole} "
                     f"{p['projected_hours']:.1f} h |")
    if "protocol_no_budget" in r:
        p, q = r["protocol"], r["protocol_no_budget"]
        lines.append(f"| the same round(s): micro-batches bounded by {p['micro_batch_tokens']} tokens (the default) "
                     f"vs by 8 examples only | peak RSS {p['peak_rss_mb']:,.0f} vs {q['peak_rss_mb']:,.0f} "
                     f"MB; {p['tokens_per_s']:.0f} vs {q['tokens_per_s']:.0f} real tokens/s "
                     f"({100 * (p['tokens_per_s'] / q['tokens_per_s'] - 1):+.1f}%) |")
    return "\n".join(lines) + "\n"
