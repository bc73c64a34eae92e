"""One command per party: `fedit certs`, `fedit server`, `fedit site`, each party a separate OS process with its
own working directory, HOME and only the files that party has, over TLS with node authentication on 127.0.0.1.

The server holds no client data (no partition, no test file); each site holds its own records, its key and
the CA certificate. The run is compared with the in-process simulation on the same files, with the same
drop (a site killed while training round 2, then started again with the same command)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fedit import config, runner, server
from fedit.adapter import load_adapter_file
from fedit.protocol import Failure
from fedit.runtime import flower_cli

from conftest import make_records, tiny_config, write_jsonl
from test_flower import children, free_ports

BIN = Path(sys.executable).parent


class Network:
    """Each party in its own network namespace (as root, with iproute2): the server's namespace holds a bridge at
    10.77.0.1, each site's a veth at 10.77.0.(10 + i) on it, so the SuperLink's address is the only thing that
    connects them, as between machines. Elsewhere (not root, no `ip netns`) every party shares 127.0.0.1, and
    ``why`` says so."""

    def __init__(self, sites: int):
        self.names: list[str] = []
        self.why = ""
        if os.geteuid() != 0 or not shutil.which("ip"):
            self.why = "not root or no iproute2: the parties share 127.0.0.1"
            return
        tag = f"{os.getpid() % 100000}"
        try:
            self.server = self._ns(f"fsrv{tag}")
            self._ip("-n", self.server, "link", "add", "br0", "type", "bridge")
            self._ip("-n", self.server, "addr", "add", "10.77.0.1/24", "dev", "br0")
            self._ip("-n", self.server, "link", "set", "br0", "up")
            self.sites = []
            for i in range(sites):
                ns = self._ns(f"fs{i}{tag}")
                self._ip("link", "add", f"fa{i}{tag}", "type", "veth", "peer", "name", f"fb{i}{tag}")
                self._ip("link", "set", f"fa{i}{tag}", "netns", self.server)
                self._ip("link", "set", f"fb{i}{tag}", "netns", ns)
                self._ip("-n", self.server, "link", "set", f"fa{i}{tag}", "master", "br0", "up")
                self._ip("-n", ns, "addr", "add", f"10.77.0.{10 + i}/24", "dev", f"fb{i}{tag}")
                self._ip("-n", ns, "link", "set", f"fb{i}{tag}", "up")
                self.sites.append(ns)
        except subprocess.CalledProcessError as e:
            self.close()
            self.why = f"`ip netns` failed here ({e.stderr.strip()[:200]}): the parties share 127.0.0.1"

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def _ns(self, name: str) -> str:
        self._ip("netns", "add", name)
        self.names.append(name)
        self._ip("-n", name, "link", "set", "lo", "up")
        return name

    @property
    def address(self) -> str:
        return "127.0.0.1" if self.why else "10.77.0.1"

    def prefix(self, party: int | None) -> list[str]:
        """The command prefix that runs a party in its namespace (None: the server)."""
        if self.why:
            return []
        return ["ip", "netns", "exec", self.server if party is None else self.sites[party]]

    def close(self) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.names = []


class Party:
    """A process of one party, in its own directory and HOME, with its output collected line by line."""

    def __init__(self, name: str, args: list[str], cwd: Path):
        self.name, self.lines = name, []
        home = cwd / "home"
        home.mkdir(exist_ok=True)
        env = {**flower_cli.flwr_env(home / ".flwr"), "HOME": str(home), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text()):
            assert self.proc.poll() is None or re.search(pattern, self.text()), \
                f"{self.name} ended before {pattern!r}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"{self.name}: no {pattern!r} in {timeout} s:\n{self.text()[-3000:]}"
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the party and every process under it: a machine that dies, not one that shuts down."""
        below = children(self.proc.pid)
        for pid in [self.proc.pid, *below]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Ctrl-C
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        for pid in children(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """Certificates, three sites' data, and a server config without data: each in its party's folder."""
    from fedit.data import partition
    from fedit.data.records import load_records

    root = tmp_path_factory.mktemp("deploy")
    loaded = load_records(write_jsonl(root / "records.jsonl", make_records()))
    parts = root / "operator" / "parts"  # only for the in-process reference run
    partition.write(parts, loaded, partition.split(loaded.records, 3, "iid", seed=1, test_per_category=0),
                    scheme="iid", seed=1, alpha=0.5, test_per_category=0)
    net = Network(3)
    done = subprocess.run([str(BIN / "fedit"), "certs", "--out", str(root / "operator" / "certs"), "--sites", "3",
                           "--host", net.address, "--host", "127.0.0.1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "to site site-1 only: site-1.key (its secret), ca.crt" in done.stdout
    for i in range(3):
        site = root / f"site{i}"
        shutil.copytree(root / "operator" / "certs" / f"site-{i}", site)
        shutil.copyfile(parts / f"client_00{i}.jsonl", site / "records.jsonl")
        assert sorted(p.name for p in site.iterdir()) == ["ca.crt", "records.jsonl", f"site-{i}.key",
                                                          f"site-{i}.key.pub"]
    shutil.copytree(root / "operator" / "certs" / "server", root / "server" / "certs")
    assert not list((root / "server").rglob("*.jsonl"))  # the server holds no records
    yield root, parts, net
    net.close()


SECTIONS = {"federation": {"rounds": 4, "clients_per_round": 3, "strategy": "scaffold", "round_timeout": 30.0,
                           "max_examples": 100},
            "data": {"client_validation": 0.25}, "run": {"keep_best": True}}


def test_one_command_per_party_with_a_site_that_dies_and_comes_back(world, tmp_path, tiny_model_dir):
    root, parts, net = world
    print(f"network: {net.why or 'each party in its own network namespace; the sites dial 10.77.0.1'}")
    port = free_ports(1)[0]
    cfg = tiny_config(tiny_model_dir, parts, root / "server" / "run", **SECTIONS).replace(data={"clients_dir": ""})
    (root / "server" / "run.toml").write_text(config.to_toml(cfg))
    sites: dict[int, Party] = {}

    def site(i: int) -> Party:
        return Party(f"site {i}", [*net.prefix(i), str(BIN / "fedit"), "site", "--data", "records.jsonl", "--server",
                                   f"{net.address}:{port}", "--root-certificates", "ca.crt", "--auth-key",
                                   f"site-{i}.key"], root / f"site{i}")

    srv = Party("server", [*net.prefix(None), str(BIN / "fedit"), "server", "--config", "run.toml", "--certs",
                           "certs", "--host", "0.0.0.0", "--port", str(port), "--node-wait", "120"], root / "server")
    intruder = tmp_path / "intruder"
    intruder.mkdir()
    shutil.copyfile(root / "site0" / "records.jsonl", intruder / "records.jsonl")
    shutil.copyfile(root / "site0" / "ca.crt", intruder / "ca.crt")
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(intruder / "mine.key")],
                   check=True)
    try:
        srv.wait_for("site site-2: client 2, key site-2.pub registered", 120)
        sites = {i: site(i) for i in range(3)}
        for s in sites.values():
            s.wait_for("this site sends the server: its trained LoRA adapter", 60)
        # a key the server never registered: refused, and the site says so
        stranger = Party("intruder", [*net.prefix(0), str(BIN / "fedit"), "site", "--data", "records.jsonl",
                                      "--server", f"{net.address}:{port}", "--root-certificates", "ca.crt",
                                      "--auth-key", "mine.key", "--join-timeout", "5"], intruder)
        # site 1 dies as it starts training round 2 (its SuperNode and worker with it), then comes back
        sites[1].wait_for("round 2: training as client 1", 300)
        sites[1].kill()
        srv.wait_for(r"round 2: client 1 dropped", 120)
        sites[1] = site(1)
        srv.proc.wait(900)
        assert srv.proc.returncode == 0, srv.text()[-4000:]
        stranger.proc.wait(120)
        stranger.reader.join(5)
    finally:
        for s in [*sites.values(), srv]:
            s.stop()
    assert "Flower run" in srv.text() and "finished:completed" in srv.text()
    assert "defence: none" in srv.text()
    assert stranger.proc.returncode == 2 and "the server refused site mine for 5 s" in stranger.text()
    assert "Traceback" not in stranger.text() + srv.text()

    # the same run in-process, on the same files, with client 1's updates lost in the same rounds (killed in
    # round 2; in round 3 the server may still see its dead session, about a minute, and pick it)
    sim, dep = server.RunDir(tmp_path / "sim"), server.RunDir(root / "server" / "run")
    lost = {(c["round"], c["client"]) for c in dep.events("client") if not c["accepted"]}
    assert lost and {c for _, c in lost} == {1} and (2, 1) in lost
    back = [c["round"] for c in dep.events("client") if c["client"] == 1 and c["accepted"] and c["round"] > 2]
    assert back, "the restarted site was never trained again"
    from fedit.runtime import simulation

    real_fit = simulation.Simulation.fit

    def dropping_fit(self, r, instructions):
        keep = [ins for ins in instructions if (r, ins.client_id) not in lost]
        yield from real_fit(self, r, keep)
        for ins in instructions:
            if (r, ins.client_id) in lost:
                yield Failure(ins.client_id, "killed")

    simulation.Simulation.fit = dropping_fit
    try:
        runner.run(tiny_config(tiny_model_dir, parts, tmp_path / "sim", eval={"test": False}, **SECTIONS))
    finally:
        simulation.Simulation.fit = real_fit
    assert [r["clients"] for r in dep.events("round")] == [r["clients"] for r in sim.events("round")] == [
        [], [0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1, 2]]
    # the restarted site trained from its control variate of round 1, read from its own disk: every round's
    # adapter (and so the server's control variate) equals the simulation's
    for r in (1, 2, 3, 4):
        a, b = load_adapter_file(sim.round_dir(r)), load_adapter_file(dep.round_dir(r))
        assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in a), r
    for r in (0, 1, 4):  # (between the kill and the return a site's evaluation may be missing)
        va, vb = sim.events("round")[r]["validation"], dep.events("round")[r]["validation"]
        assert vb["clients"] == 3 and vb["loss"] == pytest.approx(va["loss"], rel=1e-5)
    assert (root / "site1" / "home" / ".fedit" / "sites" / "site-1" / "client_state" / "client_00001").is_dir()
    # the data-less server kept its best round by the sites' validation alone (its own figures: between the kill
    # and the return one site's evaluation may be missing, so the simulation's choice may differ)
    rows = dep.events("round")
    assert dep.read_state()["best"]["round"] == min(rows, key=lambda r: r["validation"]["loss"])["round"]
    assert (dep.path / "best" / "adapter_model.safetensors").is_file() and (dep.path / "loss.png").is_file()
    # the model stays loaded: from round 2 on a site pays almost nothing before training
    first = {i: float(re.search(r"model ready in ([0-9.]+) s", s.text()).group(1)) for i, s in sites.items()
             if i != 1}
    for c in dep.events("client"):
        if c["accepted"] and c["client"] != 1 and c["round"] >= 2:
            assert c["metrics"]["load_seconds"] < 0.05 * max(first[c["client"]], 0.02), c


def test_a_site_with_bad_data_never_connects(world, tmp_path):
    root, _, _ = world
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("ca.crt", "site-0.key", "site-0.key.pub"):  # the site's files, not what an earlier run left in its HOME
        shutil.copyfile(root / "site0" / f, bad / f)
    write_jsonl(bad / "records.jsonl", ['{"instruction": "no answer"}', "not json"])
    p = Party("bad data", [str(BIN / "fedit"), "site", "--data", "records.jsonl", "--server", "127.0.0.1:9",
                           "--root-certificates", "ca.crt", "--auth-key", "site-0.key"], bad)
    p.proc.wait(60)
    p.reader.join(5)
    assert p.proc.returncode == 2
    assert "line 1: no instruction/response fields" in p.text() and "line 2: invalid JSON" in p.text()
    assert "nothing was sent to the server" in p.text()
    assert "Traceback" not in p.text() and not list((bad / "home").rglob("supernode.log"))


def test_certs_are_valid_for_the_servers_own_address_and_refuse_colliding_names(tmp_path):
    done = subprocess.run([str(BIN / "fedit"), "certs", "--out", str(tmp_path / "c"), "--sites", "2", "--host",
                           "fl.example.org"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    san = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "c/server/server.crt"), "-noout", "-ext",
                          "subjectAltName"], capture_output=True, text=True).stdout
    # the address the sites dial, and 127.0.0.1, which the server's own SuperExec and flwr calls dial
    assert "DNS:fl.example.org" in san and "IP Address:127.0.0.1" in san and "DNS:localhost" in san
    assert oct((tmp_path / "c/site-1/site-1.key").stat().st_mode & 0o777) == "0o600"
    done = subprocess.run([str(BIN / "fedit"), "certs", "--out", str(tmp_path / "d"), "--names", "0,site-0"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "distinct" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())  # nothing half-written


def test_a_site_stopped_by_sigterm_takes_its_supernode_with_it(world, tmp_path):
    """kill or systemd stop (SIGTERM) stops a site as Ctrl-C does: its SuperNode, in a session of its own, goes too."""
    root, _, _ = world
    p = Party("site", [str(BIN / "fedit"), "site", "--data", "records.jsonl", "--server", f"127.0.0.1:{free_ports(1)[0]}",
                       "--root-certificates", "ca.crt", "--auth-key", "site-0.key", "--state", str(tmp_path / "s")],
              root / "site0")
    node = None
    try:
        p.wait_for("joining 127.0.0.1", 60)
        deadline = time.monotonic() + 60
        while not any("flower-supernode" in _cmd(pid) for pid in children(p.proc.pid)):
            assert time.monotonic() < deadline, p.text()
            time.sleep(0.2)
        node = next(pid for pid in children(p.proc.pid) if "flower-supernode" in _cmd(pid))
        p.proc.send_signal(signal.SIGTERM)
        p.proc.wait(60)
        p.reader.join(5)
        assert "site site-0 stopped" in p.text()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{node}").exists() and "Z" not in _state(node) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(f"/proc/{node}").exists() or "Z" in _state(node), "the SuperNode outlived its site"
    finally:
        p.stop()
        if node is not None and Path(f"/proc/{node}").exists():  # (when the test fails: the orphan is ours to end)
            os.kill(node, signal.SIGKILL)


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
