"""What a site pays before training, per round, on a Flower deployment: the warm worker of `fedit site`
against a plain SuperNode that loads the base model in every message's fresh ClientApp process.

    python benchmarks/sites.py --data dolly-15k.jsonl --out bench-sites [--model NAME] [--rounds 3] [--sites 3]

Both modes run the same federation on this machine over 127.0.0.1 with TLS and site keys (`fedit certs`,
`fedit server`): 3 sites of 20 records each, every site in every round, one optimizer step each (batch 4,
cutoff 128), no evaluation. "warm": each site started with `fedit site`; "reload": each site a plain
`flower-supernode` with `--node-config 'client-id=N data-path=...'` (the way before `fedit site`). Reports,
per round, each site's `load_seconds` (from the message's arrival in the process that trains to a model ready
to train) and the round's wall time, and the ratio of rounds 2+ to round 1, all from one run of each mode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], cwd: Path, log: Path, env: dict) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def stop(p: subprocess.Popen) -> None:
    for sig in (signal.SIGINT, signal.SIGKILL):
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
                p.wait(20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


def run_mode(mode: str, work: Path, certs: Path, files: list[Path], model: str, rounds: int) -> dict:
    from fedit import config, server

    d = work / mode
    d.mkdir(parents=True)
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cfg = config.from_dict({
        "model": {"name": model}, "data": {"clients_dir": ""},
        "train": {"batch_size": 4, "micro_batch_size": 4, "cutoff_len": 128, "max_steps": 1},
        "federation": {"rounds": rounds, "clients_per_round": len(files), "max_examples": 100,
                       "round_timeout": 600.0},
        "eval": {"every": 0}, "run": {"out": str(d / "run"), "report_to": [], "progress": False}})
    (d / "run.toml").write_text(config.to_toml(cfg))
    port = free_port()
    procs = [start([str(BIN / "fedit"), "server", "--config", "run.toml", "--certs", str(certs / "server"),
                    "--host", "127.0.0.1", "--port", str(port), "--node-wait", "300"], d, d / "server.log", env)]
    try:
        deadline = time.monotonic() + 120
        while f"client {len(files) - 1}, key" not in (d / "server.log").read_text():
            assert procs[0].poll() is None and time.monotonic() < deadline, (d / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        for i, f in enumerate(files):
            site, key = certs / f"site-{i}", certs / f"site-{i}" / f"site-{i}.key"
            if mode == "warm":
                args = [str(BIN / "fedit"), "site", "--data", str(f), "--server", f"127.0.0.1:{port}",
                        "--root-certificates", str(site / "ca.crt"), "--auth-key", str(key), "--state",
                        str(d / f"state-{i}")]
            else:
                args = [str(BIN / "flower-supernode"), "--root-certificates", str(site / "ca.crt"), "--superlink",
                        f"127.0.0.1:{port}", "--auth-supernode-private-key", str(key), "--port", str(free_port()),
                        "--node-config", f'client-id={i} data-path="{f}"']
            procs.append(start(args, d, d / f"site-{i}.log", env))
        procs[0].wait(3600)
        assert procs[0].returncode == 0, (d / "server.log").read_text()[-3000:]
    finally:
        for p in procs[::-1]:
            stop(p)
    rd = server.RunDir(d / "run")
    rows = rd.events("round")[1:]
    clients = rd.events("client")
    per_round = []
    for r in rows:
        mine = [c for c in clients if c["round"] == r["round"] and c["accepted"]]
        per_round.append({"round": r["round"], "seconds": r["seconds"],
                          "load_seconds": [c["metrics"]["load_seconds"] for c in mine],
                          "train_seconds": [c["metrics"]["seconds"] for c in mine]})
    return {"mode": mode, "rounds": per_round}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="Dolly-style JSONL records (20 per site are drawn)")
    ap.add_argument("--out", default="bench-sites")
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sites", type=int, default=3)
    a = ap.parse_args(argv)
    from fedit.data import partition
    from fedit.weights import resolve_source

    out = Path(a.out).resolve()  # the parties run in folders of their own: every path they get is absolute
    out.mkdir(parents=True, exist_ok=False)
    model = str(resolve_source(a.model))  # fetched and converted once, before either mode is timed
    partition.make(a.data, out / "data", clients=a.sites, scheme="iid", test_per_category=1, sample=20 * a.sites + 8,
                   seed=1)
    files = [out / "data" / partition.client_file(i, a.sites) for i in range(a.sites)]
    subprocess.run([str(BIN / "fedit"), "certs", "--out", str(out / "certs"), "--sites", str(a.sites)], check=True,
                   capture_output=True)
    res = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "model": a.model,
           "date": time.strftime("%Y-%m-%d %H:%M"),
           "modes": {m: run_mode(m, out, out / "certs", files, model, a.rounds) for m in ("reload", "warm")}}
    lines = ["| mode | round | round wall time (s) | load_seconds per site | train seconds per site |",
             "| --- | --- | --- | --- | --- |"]
    for m, r in res["modes"].items():
        for row in r["rounds"]:
            lines.append(f"| {m} | {row['round']} | {row['seconds']:.1f} | "
                         f"{', '.join(f'{x:.3f}' for x in row['load_seconds'])} | "
                         f"{', '.join(f'{x:.2f}' for x in row['train_seconds'])} |")
    for m, r in res["modes"].items():
        first = sum(r["rounds"][0]["load_seconds"]) / len(r["rounds"][0]["load_seconds"])
        later = [x for row in r["rounds"][1:] for x in row["load_seconds"]]
        res["modes"][m]["later_over_first"] = (sum(later) / len(later)) / first if later and first else None
        lines.append(f"\n{m}: rounds 2+ pay {100 * res['modes'][m]['later_over_first']:.1f}% of round 1's mean "
                     f"load_seconds ({first:.3f} s)")
    (out / "sites.json").write_text(json.dumps(res, indent=2))
    (out / "sites.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
