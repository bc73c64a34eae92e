"""scripts/experiments.py: every command it would start parses as fedit's CLI (valid overrides) or names runs the
privacy script accepts, and --jobs bounds how many run at once (commands are replaced by sleeps; nothing trains)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedit import config
from fedit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("smoke", [False, True])
def test_every_command_parses_and_its_overrides_are_valid_config(tmp_path, smoke):
    ex = _load("experiments")
    a = argparse.Namespace(data="d.jsonl", smoke=smoke, extra=["model.dtype=fp32"], only="")
    ex.write_ranks_file(a, tmp_path)
    first, todo = ex.jobs(a, [42, 43], tmp_path)
    assert {k.rsplit("-", 1)[0] for k in todo if k != "scaled"} >= {"strategies-a", "strategies-b", "gap", "iid",
                                                                    "ranks"}
    assert len([k for k in todo if k.startswith("privacy-")]) == 2 * len(ex.PRIVACY_RUNS) and "scaled" in todo
    fedit_cmds = [c for cmds in todo.values() for c in cmds if c[1:3] == ["-m", "fedit.cli"]]
    assert len(fedit_cmds) == 2 * 5
    for cmd in fedit_cmds:
        args = build_parser().parse_args(cmd[3:])  # overrides after options: argparse takes them all
        assert args.seeds == "42" or args.seeds == "43"
        config.load(None, args.overrides)  # the overrides shared by all entries are valid keys and values
    gap = next(c for c in fedit_cmds if "gap" in c[c.index("--out") + 1])
    assert "train.max_steps=17" in gap and "short:federation.rounds=28" in gap
    # every run named is one privacy_experiment.py accepts (its own parser), and each job's data is written first
    parse_run = _load("privacy_experiment").parse_run
    names = [c[c.index("--runs") + 1] for k, cmds in todo.items() if k.startswith(("privacy-", "scaled")) for c in cmds]
    assert len(names) == 2 * 6 + 2 and all(parse_run(n) is not None for n in names)
    assert parse_run("clip-C0.1-poisson") is None and parse_run("z0-C1") is None  # the parser does refuse
    assert sum("--data-only" in c for c in first) == 3  # two seeds and the scaled run
    alpha = (tmp_path / "ranks-alpha.toml").read_text()
    assert alpha.count("[") == (4 if smoke else 20) and "[1]\nr = 4\nalpha = 4\n" in alpha


def test_jobs_bounds_the_runs_at_once(tmp_path, monkeypatch):
    ex = _load("experiments")
    marks = tmp_path / "marks"
    marks.mkdir()
    # each job notes how many are running when it starts, then sleeps
    probe = f"n=$(ls {marks} | wc -l); touch {marks}/$$; echo $n >> {tmp_path}/seen; sleep 1; rm {marks}/$$"
    monkeypatch.setattr(ex, "jobs", lambda a, seeds, out: ([], {f"j{i}-{s}": [["bash", "-c", probe]]
                                                             for i in range(6) for s in seeds}))
    monkeypatch.setattr(ex, "summarise", lambda *args: None)
    monkeypatch.setattr(sys, "argv", ["experiments.py", "--data", "d", "--out", str(tmp_path / "o"), "--seeds", "1",
                                      "--jobs", "2"])
    ex.main()
    seen = [int(x) for x in (tmp_path / "seen").read_text().split()]
    assert len(seen) == 6 and max(seen) <= 1  # at most one other job ran when any started
    record = json.loads((tmp_path / "o" / "jobs.json").read_text())
    assert all(record[f"j{i}-1"]["ended"] == "finished" for i in range(6))


def test_privacy_report_counts_the_rounds_the_canary_client_joined():
    # A Poisson draw need not give the canary client the rounds the fixed-size draw would: the report counts
    # the round rows of each run's metrics that list it (round 0, the evaluation before training, is not one).
    rows = [{"event": "round", "round": 0, "clients": [17]},
            {"event": "round", "round": 1, "clients": [17, 3]},
            {"event": "round", "round": 2, "clients": [3]},
            {"event": "round", "round": 3, "clients": [4, 17]}]
    joined = _load("privacy_experiment").rounds_joined
    assert (joined(rows, 17), joined(rows, 3), joined(rows, 5)) == (2, 2, 0)


@pytest.mark.parametrize("script", ["privacy_experiment", "robustness_experiment"])
def test_experiment_scripts_end_a_user_error_in_one_line(tmp_path, script):
    # A wrong --data path is fedit's own error (FeditError): one line on stderr naming the script, exit status 2
    # (as `fedit` gives), no traceback and no --out directory half-made.
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), "--data", str(tmp_path / "no.jsonl"),
                        "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"{script}.py: error: data file {tmp_path / 'no.jsonl'} does not "
                                                 "exist; check the path")
    assert not out.exists()
