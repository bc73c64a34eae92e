"""fedit on Flower (flwr 1.41): the runtime adapter against a fake Grid, and real deployments on 127.0.0.1.

The deployment tests start a SuperLink and SuperNodes as processes on free
loopback ports (TLS with certificates made by openssl, SuperNode authentication
with ssh-keygen keys), run fedit through `fedit flower run`'s launcher, and stop
every process they started by its PID, also when a test fails.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fedit import runner, server
from fedit.protocol import Failure, FitIns, Update
from fedit.adapter import load_adapter_file
from fedit.runtime import flower, flower_cli

from conftest import ROOT, tiny_config

BIN = Path(sys.executable).parent


# ---------------------------------------------------------------- the adapter, against a fake Grid

class FakeGrid:
    """Replies as scripted per node: an adapter, an error, or silence."""

    def __init__(self, nodes: dict[int, int], behaviour: dict[int, str], adapter):
        self.nodes, self.behaviour, self.adapter = nodes, behaviour, adapter  # node id -> client id
        self.sent: dict[str, object] = {}

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            mid = f"m{len(self.sent)}"
            m.metadata.__dict__["_message_id"] = mid
            self.sent[mid] = m
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        from flwr.app import Error, Message, MetricRecord, RecordDict

        out = []
        for mid in ids:
            m = self.sent[mid]
            node = m.metadata.dst_node_id
            cid = self.nodes[node]
            how = self.behaviour.get(cid, "ok")
            if m.metadata.message_type == "query":
                content = RecordDict({"node": flower.ConfigRecord({"client-id": cid, "data-path": ""})})
                if how == "badquery":  # a node that answers "who are you" with nonsense
                    content = RecordDict({"node": flower.ConfigRecord({"client-id": "zero"})})
                elif how == "noquery":
                    content = RecordDict({})
                out.append(Message(content, reply_to=m))
            elif m.metadata.message_type == "evaluate":
                ev = {"client-id": cid if how != "liar" else cid + 100, "examples": 3, "categories": ["a", "b"],
                      "loss-sums": [6.0, 2.0 + cid], "tokens": [3, 2], "counts": [2, 1]}
                if how == "malformed":  # lists of unequal length
                    ev["tokens"] = [3]
                out.append(Message(RecordDict({"evaluation": flower.ConfigRecord(ev)}), reply_to=m))
            elif how in ("ok", "liar", "collider"):
                reply = flower.ConfigRecord({"client-id": cid if how != "liar" else cid + 100, "num-examples": 10 + cid})
                # a client's metrics may use any name, the server's own field names included
                metrics = {"train_loss": 1.5} if how != "collider" else {
                    "train_loss": 1.5, "client-id": 99, "num-examples": 10**9, "round": 7, "accepted": 0}
                out.append(Message(RecordDict({"arrays.adapter": flower.adapter_to_record(self.adapter),
                                               "reply": reply, "metrics": MetricRecord(metrics)}), reply_to=m))
            elif how == "malformed":
                out.append(Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), reply_to=m))
            elif how == "error":
                out.append(Message(Error(code=2, reason="ValueError: boom"), reply_to=m))
            elif how == "silent":
                continue
        return out


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages take their run and node id from the process they are made in (a ServerApp process in Flower)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _runtime(behaviour, timeout=0.0, nodes=None):
    adapter = {"a.lora_A.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    cfg = tiny_config(Path("m"), Path("c"), Path("o"), federation={"round_timeout": timeout})
    grid = FakeGrid(nodes or {101: 0, 102: 1, 103: 2}, behaviour, adapter)
    ns = flower.Nodes(grid, node_wait=2.0)
    return flower.FlowerRuntime(grid, cfg, ns, poll=0.01), adapter


def _fitins(adapter, ids, r=1):
    return [FitIns(r, cid, {"global": adapter}, {"state_round": 0}) for cid in ids]


def test_runtime_turns_replies_errors_and_silence_into_updates_and_failures():
    rt, adapter = _runtime({1: "error", 2: "silent"}, timeout=0.3)
    out = list(rt.fit(1, _fitins(adapter, [0, 1, 2])))
    updates = [u for u in out if isinstance(u, Update)]
    failures = {f.client_id: f.reason for f in out if isinstance(f, Failure)}
    assert [u.client_id for u in updates] == [0]
    assert updates[0].num_examples == 10 and updates[0].metrics == {"train_loss": 1.5}
    assert torch.equal(updates[0].adapter["a.lora_A.weight"], adapter["a.lora_A.weight"])
    assert set(failures) == {1, 2}
    assert "ClientApp raised" in failures[1] and "boom" in failures[1]
    assert "round_timeout = 0.3 s" in failures[2]
    # the train message carries the round and the fedit config; the adapter went over as an ArrayRecord
    sent = [m for m in rt.grid.sent.values() if m.metadata.message_type == "train"]
    assert {m.metadata.dst_node_id for m in sent} == {101, 102, 103}
    assert sent[0].content["config"]["round"] == 1 and "[federation]" in sent[0].content["config"]["fedit-config"]
    # and decodes to the FitIns it was made from
    back = flower.content_to_fitins(sent[0].content)
    assert (back.round, back.client_id, back.config) == (1, 0, {"state_round": 0})
    assert torch.equal(back.global_adapter["a.lora_A.weight"], adapter["a.lora_A.weight"])


def test_client_metrics_never_collide_with_the_servers_fields():
    rt, adapter = _runtime({0: "collider", 1: "malformed"})
    out = list(rt.fit(1, _fitins(adapter, [0, 1, 2])))
    (u0,) = [u for u in out if isinstance(u, Update) and u.client_id == 0]
    assert u0.num_examples == 10 and u0.metrics["num-examples"] == 10**9 and u0.metrics["round"] == 7
    failures = {f.client_id: f.reason for f in out if isinstance(f, Failure)}
    assert list(failures) == [1] and "malformed reply" in failures[1]


def test_runtime_fails_clients_without_a_node_and_replies_from_the_wrong_client():
    rt, adapter = _runtime({2: "liar"}, nodes={101: 0, 103: 2})
    out = list(rt.fit(1, _fitins(adapter, [0, 1, 2])))
    failures = {f.client_id: f.reason for f in out if isinstance(f, Failure)}
    assert [u.client_id for u in out if isinstance(u, Update)] == [0]
    assert "no connected SuperNode has client-id = 1" in failures[1]
    assert "no longer client 2" in failures[2]


def test_evaluation_messages_decode_to_evaluations_or_failures():
    from fedit.protocol import EvalIns, Evaluation

    rt, adapter = _runtime({1: "malformed", 2: "liar"}, nodes={101: 0, 102: 1, 103: 2, 104: 3})
    rt.nodes.refresh()
    del rt.grid.nodes[104]  # client 3 left before the evaluation
    out = list(rt.evaluate(2, [EvalIns(2, c, {"global": adapter}) for c in (0, 1, 2, 3)]))
    evals = [e for e in out if isinstance(e, Evaluation)]
    failures = {f.client_id: f.reason for f in out if isinstance(f, Failure)}
    assert [(e.client_id, e.by_category, e.examples) for e in evals] == [(0, {"a": [6.0, 3, 2], "b": [2.0, 2, 1]},
                                                                           3)]
    assert "category lists differ in length" in failures[1]
    assert "no longer client 2" in failures[2]
    assert "no connected SuperNode has client-id = 3" in failures[3]
    sent = [m for m in rt.grid.sent.values() if m.metadata.message_type == "evaluate"]
    assert len(sent) == 3 and all(m.content["config"]["round"] == 2 for m in sent)
    assert torch.equal(flower.content_to_fitins(sent[0].content).global_adapter["a.lora_A.weight"],
                       adapter["a.lora_A.weight"])


def test_a_malformed_who_are_you_answer_makes_a_node_unusable_not_the_server_crash():
    rt, _ = _runtime({1: "badquery", 2: "noquery"})
    rt.nodes.refresh()
    assert rt.nodes.by_client == {0: 101} and rt.nodes.known[102] is None and rt.nodes.known[103] is None


def test_nodes_learn_client_ids_and_forget_nodes_that_left():
    rt, _ = _runtime({})
    rt.nodes.refresh()
    assert rt.nodes.by_client == {0: 101, 1: 102, 2: 103}
    del rt.grid.nodes[102]
    rt.nodes.refresh()
    assert rt.nodes.by_client == {0: 101, 2: 103}


def test_core_code_does_not_import_flwr():
    offenders = []
    for py in (ROOT / "fedit").rglob("*.py"):
        if "flower" in py.name:
            continue
        text = py.read_text()
        if "import flwr" in text or "from flwr" in text:
            offenders.append(str(py))
    assert offenders == []


def test_launcher_writes_an_app_with_only_code(tmp_path):
    app = flower_cli.write_app(tmp_path / "app")
    files = {str(p.relative_to(app)) for p in app.rglob("*") if p.is_file()}
    assert "pyproject.toml" in files and "fedit/runtime/flower.py" in files
    assert all(f == "pyproject.toml" or f.endswith(".py") for f in files)
    import tomllib

    conf = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert conf["components"]["serverapp"] == "fedit.runtime.flower:server_app"
    assert set(conf["config"]) == set(flower.RUN_CONFIG)


def test_the_servers_log_reaches_the_operator_while_the_run_goes_on(tmp_path, monkeypatch):
    """`fedit server` shows the run's log through `flwr log --stream`, a Python program that prints into a pipe.
    Under flwr_env a line it prints is shown while it still runs, not when 8 KB have piled up or it exits (the
    deployment test waited two minutes for a round's drop in a shell without PYTHONUNBUFFERED)."""
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    child = subprocess.Popen([sys.executable, "-c", "import sys; print('INFO fedit.flower: round 2: client 1 "
                              "dropped'); sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=flower_cli.flwr_env(tmp_path))
    shown: list[str] = []
    reader = threading.Thread(target=flower_cli._follow, args=(child, shown.append), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while not shown and time.monotonic() < deadline:
            time.sleep(0.05)
        running, seen = child.poll() is None, list(shown)
    finally:
        child.stdin.close()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:  # never leave the child behind
            child.kill()
            child.wait()
        reader.join(10)  # it ends at the child's end of output; then its pipe can be closed
        child.stdout.close()
    assert running and seen == ["INFO fedit.flower: round 2: client 1 dropped"]


# ---------------------------------------------------------------- real deployments on 127.0.0.1

def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def children(pid: int) -> list[int]:
    """Every process below ``pid`` (walking /proc), so teardown can stop them by PID too."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Deployment:
    """A SuperLink (TLS + SuperNode authentication) and SuperNodes, each a process this object stops."""

    def __init__(self, root: Path):
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.home = root / "flwr-home"
        self.home.mkdir()
        self.env = {**flower_cli.flwr_env(self.home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = free_ports(1)[0]
        self.certs = root / "certs"

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                             start_new_session=True)
        log.close()
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def make_certificates(self) -> None:
        """The commands of docs/flower.md, step 2."""
        c = self.certs
        c.mkdir()
        missing = [t for t in ("openssl", "ssh-keygen") if not shutil.which(t)]
        if missing:  # a failure, never a skip
            pytest.fail(f"{', '.join(missing)} absent: run scripts/setup-system.sh (the TLS deployment test needs them)")
        run = lambda *a: subprocess.run(a, cwd=c, check=True, capture_output=True)  # noqa: E731
        run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365", "-subj", "/CN=fedit-ca",
            "-keyout", "ca.key", "-out", "ca.crt")
        run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
            "-out", "server.csr")
        (c / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "365", "-extfile", "server.ext", "-out", "server.crt")

    def make_key(self, name: str) -> Path:
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", name, "-f", name],
                       cwd=self.certs, check=True, capture_output=True)
        return self.certs / name

    @property
    def conn(self) -> dict:
        return {"address": f"127.0.0.1:{self.port}", "root-certificates": str(self.certs / "ca.crt")}

    def start_superlink(self) -> None:
        c = self.certs
        self._start("superlink", [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(c / "ca.crt"),
                                  "--ssl-certfile", str(c / "server.crt"), "--ssl-keyfile", str(c / "server.key"),
                                  "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                                  "--host", "127.0.0.1", "--port", str(self.port)])
        flower_cli.write_connection(self.home, self.conn)
        deadline = time.monotonic() + 90
        while "Uvicorn running" not in self.log("superlink"):
            assert self.procs["superlink"].poll() is None, self.log("superlink")
            assert time.monotonic() < deadline, "the SuperLink did not start:\n" + self.log("superlink")
            time.sleep(0.5)

    def flwr(self, *args: str) -> dict:
        done = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], capture_output=True, text=True,
                              env=self.env)
        return json.loads(done.stdout[done.stdout.index("{"):])

    def register(self, key: Path) -> int:
        out = self.flwr("supernode", "register", f"{key}.pub", flower_cli.CONNECTION)
        assert out.get("success"), out
        return int(out["node-id"])

    def start_supernode(self, name: str, client_id: int, data: Path, key: Path, retries: int | None = None):
        args = [str(BIN / "flower-supernode"), "--root-certificates", str(self.certs / "ca.crt"),
                "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_ports(1)[0]),
                "--auth-supernode-private-key", str(key),
                "--node-config", f'client-id={client_id} data-path="{data}"']
        if retries is not None:
            args += ["--max-retries", str(retries)]
        return self._start(name, args)

    def online(self) -> set[int]:
        nodes = self.flwr("supernode", "list", flower_cli.CONNECTION).get("nodes", [])
        return {int(n["node-id"]) for n in nodes if n["status"] == "online"}

    def kill(self, name: str) -> None:
        """SIGKILL a process and everything below it: a machine that dies, not one that shuts down."""
        p = self.procs[name]
        below = children(p.pid)
        _signal_group(p.pid, signal.SIGKILL)  # its session: it was started with start_new_session
        for pid in below:
            _signal(pid, signal.SIGKILL)
        p.wait(10)

    def stop(self) -> None:
        procs = list(self.procs.values())
        below = {pid for p in procs for pid in children(p.pid)}
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        # SuperExec, ServerApp and ClientApp processes the Flower processes started: they follow their
        # parent down on their own within seconds; whatever is left then is killed by its PID.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in below):
            time.sleep(0.5)
        for p in procs:
            _signal_group(p.pid, signal.SIGKILL)
        for pid in below:
            if _alive(pid):
                _signal(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_model_dir):
    """TLS + SuperNode auth on 127.0.0.1: clients 0, 1, 2 registered; an unregistered fourth node refused."""
    from fedit.data import partition
    from fedit.data.records import load_records

    from conftest import make_records, write_jsonl

    root = tmp_path_factory.mktemp("flower")
    loaded = load_records(write_jsonl(root / "records.jsonl", make_records()))
    sp = partition.split(loaded.records, 3, "iid", seed=1, test_per_category=2)
    parts = root / "parts"
    partition.write(parts, loaded, sp, scheme="iid", seed=1, alpha=0.5, test_per_category=2)

    d = Deployment(root)
    d.parts = parts
    try:
        d.make_certificates()
        d.start_superlink()
        d.node_ids = {}
        for cid in range(3):
            key = d.make_key(f"node{cid}")
            d.node_ids[cid] = d.register(key)
            d.start_supernode(f"node{cid}", cid, parts / f"client_00{cid}.jsonl", key)
        d.start_supernode("intruder", 1, parts / "client_001.jsonl", d.make_key("intruder"), retries=1)
        yield d
    finally:
        d.stop()


def _launch(d: Deployment, cfg) -> tuple[int, str, list[str]]:
    lines: list[str] = []
    run_id, status = flower_cli.launch({"fedit-config": flower.config_to_text(flower_cli.absolute_paths(cfg)),
                                        "min-nodes": 0, "node-wait": 120.0}, d.conn, lines.append)
    return run_id, status, lines


def test_unregistered_supernode_is_refused(deployment):
    d = deployment
    intruder = d.procs["intruder"]
    deadline = time.monotonic() + 120
    while intruder.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert intruder.poll() not in (None, 0), "an unregistered SuperNode must not stay connected"
    assert "Failed to activate SuperNode" in d.log("intruder")
    assert "No SuperNode found with the given public key" in d.log("superlink")
    deadline = time.monotonic() + 60
    while d.online() != set(d.node_ids.values()) and time.monotonic() < deadline:
        time.sleep(1)
    assert d.online() == set(d.node_ids.values())


HETERO = {"mixed ranks": {"client_ranks": [2, 4]},
          "mixed-rank product": {"client_ranks": [2, 4], "aggregation": "product"},
          "mixed-rank freeze_a": {"client_ranks": [2, 4], "freeze_a": True}}


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam", "scaffold", *HETERO])
def test_deployment_matches_in_process_simulation(deployment, tmp_path, tiny_model_dir, strategy):
    """The same adapters as in-process, for FedAvg and for what other algorithms add to a round:
    FedProx's proximal term, FedAdam's server moments, SCAFFOLD's control variates (the server's
    c sent down, each client's c_k kept on its SuperNode, Δc_k sent up), and SuperNodes that train
    at different LoRA ranks (clients 0 and 2 at rank 2, client 1 at the global rank 4), with each
    aggregation (product: each SuperNode starts from its own truncation; freeze_a: each rebuilds A
    from the seeded init on its own machine)."""
    d = deployment
    sections = {"federation": {"rounds": 2, "clients_per_round": 2,
                               "strategy": "fedavg" if strategy in HETERO else strategy},
                "strategy": {"proximal_mu": 1.0} if strategy == "fedprox" else {},
                "lora": HETERO.get(strategy, {})}
    runner.run(tiny_config(tiny_model_dir, d.parts, tmp_path / "sim", **sections))
    run_id, status, lines = _launch(d, tiny_config(tiny_model_dir, d.parts, tmp_path / "flower", **sections))
    assert status == "finished:completed", "\n".join(lines)
    sim, dep = server.RunDir(tmp_path / "sim"), server.RunDir(tmp_path / "flower")
    # seed 7: rounds 1 and 2 pick [1, 2] and [0, 2]: client 2 starts round 2 from its own state
    assert [r["clients"] for r in dep.events("round")] == [r["clients"] for r in sim.events("round")] == [[], [1, 2], [0, 2]]
    assert all(c["accepted"] for c in dep.events("client")) and len(dep.events("client")) == 4
    for r in (1, 2):
        a, b = load_adapter_file(sim.round_dir(r)), load_adapter_file(dep.round_dir(r))
        assert set(a) == set(b)
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), (r, k)
    sim_loss = [r["eval"]["loss"] for r in sim.events("round")]
    assert [r["eval"]["loss"] for r in dep.events("round")] == pytest.approx(sim_loss, rel=1e-5)
    # the same run directory as `fedit run`: resolved config, PEFT adapters, resume state
    for name in ["config.toml", "run.json", "state.json", "adapter/adapter_config.json", "loss.png"]:
        assert (tmp_path / "flower" / name).exists(), name
    assert json.loads((tmp_path / "flower" / "run.json").read_text())["flower"]["client_ids"] == [0, 1, 2]
    # each train reply reports what loading the base model cost in that fresh ClientApp process
    assert all(c["metrics"]["load_seconds"] > 0 for c in dep.events("client"))
    # bytes per client: the adapter each way, SCAFFOLD's control variates beside it, half at rank 2 of 4
    adapter_bytes = sum(v.numel() * 4 for k, v in a.items() if not (strategy.endswith("freeze_a") and ".lora_A." in k))
    if strategy.endswith("freeze_a"):
        assert all(torch.equal(load_adapter_file(dep.round_dir(2))[k], load_adapter_file(dep.round_dir(0))[k])
                   for k in a if ".lora_A." in k)
    for c in dep.events("client"):
        share = {"scaffold": 2}.get(strategy, 1) * (c.get("rank", 4) / 4)
        assert c["bytes_down"] == c["bytes_up"] == adapter_bytes * share, c


def test_supernode_killed_mid_round_is_dropped_and_the_run_goes_on(deployment, tmp_path, tiny_model_dir):
    d = deployment
    # round 1 trains clients 1 and 2, round 2 clients 0 and 2 (seed 7): client 1 dies during round 1
    cfg = tiny_config(tiny_model_dir, d.parts, tmp_path / "killed",
                      federation={"rounds": 2, "clients_per_round": 2, "min_replies": 1})
    victim = d.procs["node1"]
    killed = threading.Event()

    def kill_when_training() -> None:
        # Every message runs in a fresh flwr-clientapp process: the first answers the server's query
        # (which client are you), the second trains round 1.
        seen: set[int] = set()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            seen |= {p for p in children(victim.pid) if "flwr-clientapp" in cmdline(p)}
            if len(seen) >= 2:
                d.kill("node1")
                killed.set()
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_when_training, daemon=True)
    watcher.start()
    run_id, status, lines = _launch(d, cfg)
    watcher.join(5)
    assert killed.is_set(), "client 1's SuperNode never started a ClientApp"
    assert status == "finished:completed", "\n".join(lines)
    rd = server.RunDir(tmp_path / "killed")
    rounds = rd.events("round")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [r["accepted"] for r in rounds[1:]] == [1, 2]
    drops = [c for c in rd.events("client") if not c["accepted"]]
    assert [(c["round"], c["client"]) for c in drops] == [(1, 1)]
    assert "SuperNode unavailable" in drops[0]["reason"], drops[0]["reason"]
    assert rounds[1]["rejected"] == [{"client": 1, "reason": drops[0]["reason"]}]
    accepted = [(c["round"], c["client"]) for c in rd.events("client") if c["accepted"]]
    assert sorted(accepted) == [(1, 2), (2, 0), (2, 2)]
    assert any("client 1 dropped" in line for line in lines)


def test_flower_simulation_runtime_matches_in_process_simulation(deployment, tmp_path, tiny_model_dir):
    """Flower's own simulation runtime (a SuperLink started with --simulation, virtual SuperNodes whose
    partition-id is the client id, data from data.clients_dir): the same global adapter as `fedit run`."""
    d = Deployment(tmp_path / "sim-link")
    try:
        d._start("superlink", [str(BIN / "flower-superlink"), "--simulation", "--insecure",
                               "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                               "--port", str(d.port)])
        deadline = time.monotonic() + 90
        while "Uvicorn running" not in d.log("superlink"):
            assert d.procs["superlink"].poll() is None, d.log("superlink")
            assert time.monotonic() < deadline, "the simulation SuperLink did not start:\n" + d.log("superlink")
            time.sleep(0.5)
        sections = {"federation": {"rounds": 1, "clients_per_round": 2}}
        runner.run(tiny_config(tiny_model_dir, deployment.parts, tmp_path / "sim", **sections))
        cfg = flower_cli.absolute_paths(tiny_config(tiny_model_dir, deployment.parts, tmp_path / "ray", **sections))
        lines: list[str] = []
        run_id, status = flower_cli.launch({"fedit-config": flower.config_to_text(cfg), "min-nodes": 0,
                                            "node-wait": 120.0},
                                           {"address": f"127.0.0.1:{d.port}", "insecure": True,
                                            "options": {"num-supernodes": 3}}, lines.append)
        assert status == "finished:completed", "\n".join(lines)
        a = load_adapter_file(server.RunDir(tmp_path / "sim").round_dir(1))
        b = load_adapter_file(server.RunDir(tmp_path / "ray").round_dir(1))
        assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in a)
    finally:
        d.stop()


# ---------------------------------------------------------------- secure aggregation (SecAgg+) on 127.0.0.1

@pytest.fixture(scope="module")
def secure_deployment(tmp_path_factory):
    """A plain-TCP SuperLink and four SuperNodes; client 3's node points at a file with no usable
    record, so its ClientApp fails in the train stage: after SecAgg+ shared its keys."""
    from fedit.data import partition
    from fedit.data.records import load_records

    from conftest import make_records, write_jsonl

    root = tmp_path_factory.mktemp("secagg")
    loaded = load_records(write_jsonl(root / "records.jsonl", make_records()))
    sp = partition.split(loaded.records, 4, "iid", seed=1, test_per_category=2)
    parts = root / "parts"
    partition.write(parts, loaded, sp, scheme="iid", seed=1, alpha=0.5, test_per_category=2)
    broken = write_jsonl(root / "broken.jsonl", [{"no": "instruction here"}])
    d = Deployment(root)
    d.parts = parts
    try:
        d._start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                               "--host", "127.0.0.1", "--port", str(d.port)])
        deadline = time.monotonic() + 90
        while "Uvicorn running" not in d.log("superlink"):
            assert d.procs["superlink"].poll() is None, d.log("superlink")
            assert time.monotonic() < deadline, "the SuperLink did not start:\n" + d.log("superlink")
            time.sleep(0.5)
        for cid in range(4):
            data = broken if cid == 3 else parts / f"client_00{cid}.jsonl"
            d._start(f"node{cid}", [str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                    f"127.0.0.1:{d.port}", "--port", str(free_ports(1)[0]),
                                    "--node-config", f'client-id={cid} data-path="{data}"'])
        d.conn_insecure = {"address": f"127.0.0.1:{d.port}", "insecure": True}
        yield d
    finally:
        d.stop()


def _launch_insecure(d: Deployment, cfg) -> tuple[str, list[str]]:
    lines: list[str] = []
    _, status = flower_cli.launch({"fedit-config": flower.config_to_text(flower_cli.absolute_paths(cfg)),
                                   "min-nodes": 4, "node-wait": 120.0}, d.conn_insecure, lines.append)
    return status, lines


def test_secure_aggregation_gives_the_sum_of_the_clients_that_stayed(secure_deployment, tmp_path, tiny_model_dir):
    """Round 1 asks all four clients; client 3 drops after the keys were shared (its data is unusable),
    the three others' masks still cancel (threshold: 3 of 4), and the global adapter moves by their
    unweighted mean change: what the test computes by training the three clients in-process, within
    SecAgg+'s quantisation bound."""
    from fedit.protocol import FitIns
    from fedit.runtime.flower_secagg import error_bound
    from fedit.runtime.simulation import Simulation

    d = secure_deployment
    sections = {"federation": {"rounds": 1, "clients_per_round": 4}, "secagg": {"enabled": True}}
    status, lines = _launch_insecure(d, tiny_config(tiny_model_dir, d.parts, tmp_path / "secure", **sections))
    assert status == "finished:completed", "\n".join(lines)
    rd = server.RunDir(tmp_path / "secure")
    rounds = rd.events("round")
    assert [r["accepted"] for r in rounds] == [0, 3]
    clients = {c["client"]: c for c in rd.events("client")}
    assert sorted(clients) == [0, 1, 2, 3]
    assert all(clients[c]["accepted"] and clients[c]["secure"] for c in (0, 1, 2))
    reason = clients[3]["reason"]
    assert not clients[3]["accepted"] and "failed in SecAgg+ training and masking" in reason and "usable" in reason
    # in the clear beside each masked change: timings and the clipped-value count, not loss or example count
    assert all(set(clients[c]["metrics"]) == {"seconds", "load_seconds", "secagg_clipped_values"} and
               clients[c]["metrics"]["secagg_clipped_values"] == 0 for c in (0, 1, 2))
    assert any("Secure aggregation completed" in line for line in lines), "\n".join(lines[-30:])

    # The expectation: clients 0, 1 and 2 trained in-process from the same global adapter and seed.
    cfg = tiny_config(tiny_model_dir, d.parts, tmp_path / "plain", federation={"rounds": 1})
    prep = runner.prepare(cfg)
    theta = prep.loaded.initial_adapter
    updates = list(Simulation(prep.loaded, prep.clients, cfg).fit(
        1, [FitIns(1, c, {"global": theta}, {"state_round": 0}) for c in (0, 1, 2)]))
    got = load_adapter_file(rd.round_dir(1))
    bound = error_bound(3, 1.0, 4194304) / 3 + 1e-6  # the mean's share of the sum's error, plus float32 storage
    largest = 0.0
    for k, t in theta.items():
        mean_change = sum(u.adapter[k].double() - t.double() for u in updates) / 3
        assert (got[k].double() - (t.double() + mean_change)).abs().max() <= bound, k
        largest = max(largest, float(mean_change.abs().max()))
    assert largest > 100 * bound  # the clients did move the adapter: the comparison can tell


def test_secure_aggregation_below_its_threshold_stops_the_run_cleanly(secure_deployment, tmp_path, tiny_model_dir):
    """With every share needed (threshold 1.0), client 3's drop leaves too few: nothing is unmasked, the
    run stops after round 0 with the reason, resumable, and the ServerApp does not crash."""
    d = secure_deployment
    sections = {"federation": {"rounds": 1, "clients_per_round": 4},
                "secagg": {"enabled": True, "reconstruction_threshold": 1.0}}
    status, lines = _launch_insecure(d, tiny_config(tiny_model_dir, d.parts, tmp_path / "halt", **sections))
    assert status == "finished:failed", "\n".join(lines)
    text = "\n".join(lines)
    assert "secure aggregation halted" in text and "fewer than federation.min_replies" in text, text[-3000:]
    assert "Traceback" not in text.split("secure aggregation halted")[0][-2000:]
    rd = server.RunDir(tmp_path / "halt")
    assert rd.read_state()["round"] == 0
    drops = rd.events("client")  # logged before the stop, with the reason; a resume redoes the round
    assert sorted(c["client"] for c in drops) == [0, 1, 2, 3] and not any(c["accepted"] for c in drops)
    assert all("secure aggregation halted" in c["reason"] for c in drops)


def test_secure_aggregation_under_dp_clips_on_the_clients(secure_deployment, tmp_path, tiny_model_dir):
    """Client-level DP with SecAgg+: the server cannot clip what it never sees, so each client clips its
    own change to the round's C; with C far below the changes' norms and little noise, the step is
    bounded by (3 clients × C + noise) / m: it would be orders larger if a client skipped its clip."""
    d = secure_deployment
    c, m = 1e-4, 4
    sections = {"federation": {"rounds": 1, "clients_per_round": m}, "secagg": {"enabled": True},
                "privacy": {"enabled": True, "clipping_norm": c, "noise_multiplier": 0.01, "adaptive": True}}
    status, lines = _launch_insecure(d, tiny_config(tiny_model_dir, d.parts, tmp_path / "dp", **sections))
    assert status == "finished:completed", "\n".join(lines)
    rd = server.RunDir(tmp_path / "dp")
    row = rd.events("round")[1]
    assert row["accepted"] == 3 and row["privacy"]["epsilon"] > 0 and row["privacy"]["clipping_norm"] == c
    # all three clipped: the noised count of unclipped changes is near 0, not near 3
    assert row["privacy"]["unclipped_fraction_noised"] < 1.5 / m
    theta, new = load_adapter_file(rd.round_dir(0)), load_adapter_file(rd.round_dir(1))
    step = math.sqrt(sum(float((new[k].double() - theta[k].double()).pow(2).sum()) for k in theta))
    dims = sum(v.numel() for v in theta.values())
    noise = 0.01 * c * math.sqrt(dims) * 1.5  # the noise's norm, with room (its std per value is z·C)
    assert step * m <= 3 * c + noise
    assert step > 0


class FuzzGrid(FakeGrid):
    """Every train and evaluate reply drawn from a seeded generator of what a hostile or broken client can put
    in Flower records (ConfigRecord values of every type, MetricRecords, arrays of any dtype and shape, missing
    records, errors), with an honest reply now and then."""

    def __init__(self, nodes, adapter, rng):
        super().__init__(nodes, {}, adapter)
        self.rng, self.replies = rng, 0

    def _value(self):
        import numpy as np

        r = self.rng
        return r.choice([0, -1, 2**62, 1.5, float("nan"), float("inf"), -1e300, True, "x" * r.randrange(0, 5000),
                         b"\x00\xff", [1, 2], [1.0, float("nan")], ["a", "b"], np.int64(3).item()])

    def _train(self, m, cid):
        import numpy as np
        from flwr.app import Array, Error, Message, MetricRecord, RecordDict

        r = self.rng
        self.replies += 1
        kind = r.randrange(8)
        if kind == 0 or cid == 0:  # honest (client 0 always: a round needs one valid update to go on)
            return Message(RecordDict({"arrays.adapter": flower.adapter_to_record(self.adapter),
                                       "reply": flower.ConfigRecord({"client-id": cid, "num-examples": 5}),
                                       "metrics": MetricRecord({"train_loss": 1.0})}), reply_to=m)
        if kind == 1:
            return Message(Error(code=r.choice([2, 5, 8, 99]), reason=str(self._value())[:100]), reply_to=m)
        arrays = {}
        for k in r.sample(["a.lora_A.weight", "b", "a.lora_A.weight "], r.randrange(0, 3)):
            dtype = r.choice([np.float32, np.float16, np.int64, np.bool_, np.float64, np.uint8])
            shape = r.choice([(2, 3), (3, 2), (0,), (2, 3, 1), ()])
            arr = np.asarray(np.random.default_rng(r.randrange(10**6)).standard_normal(shape) * r.choice([1, 1e30])).astype(dtype)
            arrays[k] = Array(arr)
        content = {"reply": flower.ConfigRecord({"client-id": r.choice([cid, cid + 1, "0", 1.0, -cid]),
                                                 "num-examples": self._value()})}
        if arrays:
            content["arrays." + r.choice(["adapter", "control", "adapter"])] = flower.ArrayRecord(arrays)
        metrics = {}
        for i in range(r.randrange(0, 80)):
            v = self._value()
            if isinstance(v, (int, float)) and not isinstance(v, bool) or (isinstance(v, list) and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
                metrics[r.choice(["seconds", "train_loss", f"m{i}", "x" * 200, "round", "\n"])] = v
        content["metrics"] = MetricRecord(metrics)
        if kind == 2:
            del content["reply"]
        return Message(RecordDict(content), reply_to=m)

    def _evaluate(self, m, cid):
        from flwr.app import Message, RecordDict

        r = self.rng
        self.replies += 1
        n = r.randrange(0, 4)
        ev = {"client-id": r.choice([cid, cid, cid + 1]), "examples": r.choice([3, -1, 10**6, "3"]),
              "categories": [f"c{i}" for i in range(n)] if r.random() < 0.8 else ["a", "a"],
              "loss-sums": [r.choice([2.0, 2.0, -1.0, float("nan"), float("inf"), 1e300]) for _ in range(n)]
              if r.random() < 0.9 else ["2.0"] * n,
              "tokens": [r.choice([4, -4, 10**9]) for _ in range(r.choice([n, n + 1]))],
              "counts": [1] * n}
        return Message(RecordDict({"evaluation": flower.ConfigRecord(ev)}), reply_to=m)

    def pull_messages(self, ids):
        out = []
        for mid in ids:
            m = self.sent[mid]
            cid = self.nodes[m.metadata.dst_node_id]
            kind = m.metadata.message_type
            if kind == "train":
                out.append(self._train(m, cid))
            elif kind == "evaluate":
                out.append(self._evaluate(m, cid))
            else:
                out.extend(super().pull_messages([mid]))
        return out


def test_fuzz_hostile_flower_replies_through_the_decoding_and_the_round_loop(tmp_path, caplog):
    """A few hundred generated train and evaluate replies, decoded by the Flower runtime and checked by the round
    loop (issue 28): no exception escapes, every bad reply is logged with its reason, the run completes."""
    import logging
    import random

    adapter = {"a.lora_A.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    grid = FuzzGrid({100 + c: c for c in range(6)}, adapter, random.Random(2028))
    cfg = tiny_config(Path("m"), Path("c"), tmp_path / "run", federation={"rounds": 12, "clients_per_round": 6},
                      data={"client_validation": 0.2}, eval={"test": False}, run={"report_to": []})
    rt = flower.FlowerRuntime(grid, cfg, flower.Nodes(grid, node_wait=2.0), poll=0.0)

    def save(a, path):
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in a.items()}, path / "adapter_model.safetensors")

    with caplog.at_level(logging.WARNING):
        server.run(cfg, rt, tmp_path / "run", client_ids=list(range(6)), initial_adapter=adapter, save_adapter=save,
                   validation_sizes={c: 3 for c in range(6)}, client_sizes={c: 10 for c in range(6)})
    assert grid.replies >= 140  # 12 rounds x 6 train replies, 13 evaluations x 6
    rd = server.RunDir(tmp_path / "run")
    rows = rd.events()
    assert [r["round"] for r in rows if r["event"] == "round"] == list(range(13))
    clients = [r for r in rows if r["event"] == "client"]
    assert len(clients) == 72 and all(c["accepted"] or c["reason"] for c in clients)
    assert sum(not c["accepted"] for c in clients) > 40 and sum(c["accepted"] for c in clients) >= 12
    left_out = [x for r in rows if r["event"] == "round" for x in (r.get("validation") or {}).get("left_out", [])]
    assert len(left_out) > 30 and all(isinstance(x["reason"], str) and x["reason"] for x in left_out)
    assert "Traceback" not in caplog.text
    assert torch.isfinite(load_adapter_file(rd.round_dir(12))["a.lora_A.weight"]).all()
