"""One command per party of a deployment across machines: `fedit certs`, `fedit server`, `fedit site`.

- ``fedit certs --out DIR --sites N`` makes, with openssl and ssh-keygen (the tools Flower's
  documentation uses), a certificate authority, the server's TLS certificate, and one
  authentication key pair per site, sorted into one folder per party (``server/``,
  ``site-NAME/``, and ``ca/`` to keep offline), with ``server/sites.toml`` naming each site's
  client id and public key.
- ``fedit server --config run.toml --certs DIR/server`` starts a SuperLink with TLS and
  SuperNode authentication, registers each site's public key (``flwr supernode register``),
  runs the federation on it (the same ServerApp as ``fedit flower run``, with each client
  id bound to the node its key was given: a node cannot claim another site's id) and
  writes the run directory; it holds no client data. It stops its SuperLink at the end.
- ``fedit site --data FILE --server HOST:PORT --root-certificates ca.crt --auth-key KEY``
  validates the site's data first (nothing is sent before it passes), keeps a worker with
  the base model loaded (fedit/site.py) and the site's client state on its disk, starts
  the site's SuperNode pointed at that worker, and prints what leaves the site. Ctrl-C
  stops both; the same command starts the site again with its state.

This module runs Flower's commands as processes and imports no flwr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from fedit.errors import FeditError
from fedit.runtime import flower_cli

DEFAULT_PORT = 9093


def add_parsers(sub) -> None:
    c = sub.add_parser("certs", help="make the CA, the server's TLS certificate and one key pair per site",
                       description="Writes DIR/ca (the CA's key: keep it offline), DIR/server (what the server "
                                   "operator needs) and DIR/site-NAME (what each site needs), and prints which "
                                   "folder goes to which party. Uses openssl and ssh-keygen.")
    c.add_argument("--out", required=True, metavar="DIR", help="a new directory")
    c.add_argument("--sites", type=int, default=0, help="how many sites (named site-0, site-1, ...)")
    c.add_argument("--names", default="", help="the sites' names instead, comma-separated (e.g. hospital-a,lab-b)")
    c.add_argument("--host", action="append", default=[], metavar="HOST",
                   help="the server's address as the sites will dial it: an IP or DNS name (repeatable; default "
                        "127.0.0.1 and localhost)")

    s = sub.add_parser("server", help="run the federation's server: a SuperLink with TLS and site keys, and the run",
                       description="Starts a SuperLink (TLS, SuperNode authentication), registers every site key "
                                   "of CERTS/sites.toml, runs the federation and writes the run directory (run.out). "
                                   "Exit code 0 only if the run completed.")
    s.add_argument("--config", default=None, help="the run's TOML config, as for `fedit run`")
    s.add_argument("--certs", required=True, metavar="DIR", help="the server folder of `fedit certs` (ca.crt, "
                                                                 "server.crt, server.key, sites.toml, sites/*.pub)")
    s.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on: 0.0.0.0 (every interface) or this machine's address for sites on "
                        "other machines (default 127.0.0.1: this machine only; see the warning it prints)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"the port sites dial (default {DEFAULT_PORT})")
    s.add_argument("--min-sites", type=int, default=0,
                   help="wait for this many sites before round 1 (default: every registered site)")
    s.add_argument("--node-wait", type=float, default=600.0, help="seconds to wait for them (default 600)")
    s.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run")
    s.add_argument("--secure-aggregation", action="store_true", help="as `fedit flower run --secure-aggregation`")
    s.add_argument("overrides", nargs="*", metavar="section.key=value")

    t = sub.add_parser("site", help="run one site: validate its data, keep its model loaded, join the server",
                       description="Validates the site's data, starts a worker that keeps the base model loaded and "
                                   "the site's client state on disk, and starts the site's SuperNode. Ctrl-C stops "
                                   "it; the same command starts it again where it was.")
    t.add_argument("--data", required=True, help="the site's own JSON/JSONL records")
    t.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's address")
    t.add_argument("--root-certificates", required=True, metavar="CA.crt", help="the CA certificate from the "
                                                                                "server operator")
    t.add_argument("--auth-key", required=True, metavar="KEY", help="this site's private key (fedit certs: "
                                                                   "site-NAME/NAME.key)")
    t.add_argument("--name", default="", help="a name for logs and the state folder (default: the key's name)")
    t.add_argument("--state", default="", metavar="DIR",
                   help="where the site keeps its client state between runs and restarts (default "
                        "~/.fedit/sites/NAME)")
    t.add_argument("--model", default="", help="a local copy of the base model to use instead of the server's "
                                               "model.name")
    t.add_argument("--port", type=int, default=0, help="the SuperNode's own local port (default: a free one)")
    t.add_argument("--secure-aggregation", action="store_true",
                   help="send changes only through secure aggregation (refuse rounds that ask in the clear)")
    t.add_argument("--join-timeout", type=float, default=180.0,
                   help="seconds to keep trying while the server refuses this site's key (default 180: a restarted "
                        "site waits for its previous session to expire, about a minute)")


# ---------------------------------------------------------------- fedit certs

def _tools() -> None:
    missing = [t for t in ("openssl", "ssh-keygen") if not shutil.which(t)]
    if missing:
        raise FeditError(f"{' and '.join(missing)} not found: install them (Debian: apt install openssl "
                         f"openssh-client; or scripts/setup-system.sh)")


def _sh(*args, cwd: Path) -> None:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise FeditError(f"`{' '.join(map(str, args))}` failed: {(done.stderr or done.stdout).strip()[-400:]}")


def certs_command(args: argparse.Namespace, console) -> None:
    import ipaddress

    _tools()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FeditError(f"--out {out} is not empty; choose a new directory (certificates are never overwritten)")
    names = [n.strip() for n in args.names.split(",") if n.strip()] or [f"site-{i}" for i in range(args.sites)]
    if not names:
        raise FeditError("give --sites N or --names a,b,c")
    bad = [n for n in names if not n.replace("-", "").replace("_", "").isalnum()]
    folders = [_site_folder(n) for n in names]
    if bad or len(set(folders)) != len(folders):
        raise FeditError(f"site names must be distinct letters, digits, - and _ (and name distinct folders "
                         f"site-NAME): {bad or names}")
    # the server's own processes (its SuperExec, fedit server's flwr calls) dial 127.0.0.1: always valid for it
    hosts = list(dict.fromkeys([*args.host, "127.0.0.1", "localhost"]))
    san = ",".join(f"IP:{h}" if _is_ip(h, ipaddress) else f"DNS:{h}" for h in hosts)
    ca, srv = out / "ca", out / "server"
    for d in (ca, srv / "sites"):
        d.mkdir(parents=True)
    _sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365", "-subj", "/CN=fedit-ca",
        "-keyout", "ca.key", "-out", "ca.crt", cwd=ca)
    _sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={hosts[0]}", "-keyout", "server.key",
        "-out", "server.csr", cwd=srv)
    (srv / "server.ext").write_text(f"subjectAltName={san}\n")
    _sh("openssl", "x509", "-req", "-in", "server.csr", "-CA", str((ca / "ca.crt").resolve()), "-CAkey",
        str((ca / "ca.key").resolve()), "-CAcreateserial", "-days", "365", "-extfile", "server.ext", "-out",
        "server.crt", cwd=srv)
    for f in ("server.csr", "server.ext"):
        (srv / f).unlink()
    shutil.copyfile(ca / "ca.crt", srv / "ca.crt")
    table = []
    for cid, name in enumerate(names):
        d = out / _site_folder(name)
        d.mkdir()
        _sh("ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", f"fedit {name}", "-f", f"{name}.key",
            cwd=d)
        shutil.copyfile(ca / "ca.crt", d / "ca.crt")
        shutil.copyfile(d / f"{name}.key.pub", srv / "sites" / f"{name}.pub")
        table.append(f'[{json.dumps(name)}]\nclient_id = {cid}\nkey = "sites/{name}.pub"\n')
    (srv / "sites.toml").write_text("# each site: its client id and the public key it authenticates with\n\n"
                                    + "\n".join(table))
    for key in [ca / "ca.key", srv / "server.key", *out.glob("*/*.key")]:
        key.chmod(0o600)
    say = console.print
    say(f"wrote {out}:")
    say(f"  {ca}/             keep offline: ca.key signs certificates (ca.crt is public)")
    say(f"  {srv}/         to the server machine: ca.crt, server.crt, server.key (secret), sites.toml, "
        f"sites/*.pub; its certificate is valid for {', '.join(hosts)}")
    for name in names:
        say(f"  {out / _site_folder(name)}/  to site {name} only: {name}.key (its secret), ca.crt")
    say(f"then: fedit server --config run.toml --certs {srv}; on each site: fedit site --data FILE --server "
        f"{hosts[0]}:{DEFAULT_PORT} --root-certificates ca.crt --auth-key NAME.key")


def _site_folder(name: str) -> str:
    return name if name.startswith("site-") else f"site-{name}"


def _is_ip(host: str, ipaddress) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def read_sites(certs: Path) -> dict[str, tuple[int, Path]]:
    """name -> (client id, public key file) from sites.toml; every problem named."""
    f = certs / "sites.toml"
    if not f.is_file():
        raise FeditError(f"--certs {certs}: no sites.toml; pass the server folder that `fedit certs` wrote")
    try:
        table = tomllib.loads(f.read_text())
    except tomllib.TOMLDecodeError as e:
        raise FeditError(f"{f} is not valid TOML: {e}") from None
    sites, problems = {}, []
    for name, entry in table.items():
        cid, key = (entry.get("client_id"), entry.get("key")) if isinstance(entry, dict) else (None, None)
        path = certs / str(key)
        if isinstance(cid, bool) or not isinstance(cid, int) or cid < 0:
            problems.append(f"site {name}: client_id = {cid!r}, expected a whole number >= 0")
        elif not path.is_file():
            problems.append(f"site {name}: key file {path} not found")
        else:
            sites[name] = (cid, path)
    ids = [c for c, _ in sites.values()]
    if len(set(ids)) != len(ids):
        problems.append(f"two sites share a client_id in {f}")
    if problems or not sites:
        raise FeditError(f"{f}: " + ("; ".join(problems) or "no site"))
    return sites


# ---------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, wait: float = 15.0) -> None:
    """SIGTERM a process started in its own session, then everything left in it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _exe(name: str) -> str:
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if not found:
        raise FeditError(f"the `{name}` command is not installed; pip install 'fedit[flower]'")
    return found


# ---------------------------------------------------------------- fedit server

def _stop_on_signals() -> None:
    """SIGTERM (kill, systemd) and SIGHUP (a closed terminal) stop a party as Ctrl-C does: through its
    finally, so the SuperLink or SuperNode it started in its own session does not outlive it."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def server_command(args: argparse.Namespace, console) -> None:
    from fedit import config as config_mod

    _stop_on_signals()
    if args.resume and (args.config or args.overrides or args.secure_aggregation):
        raise FeditError("--resume continues a run with the config saved in its directory; leave out --config, "
                         "--secure-aggregation and key=value overrides")
    certs = Path(args.certs)
    for f in ("ca.crt", "server.crt", "server.key"):
        if not (certs / f).is_file():
            raise FeditError(f"--certs {certs}: {f} not found; pass the server folder that `fedit certs` wrote")
    sites = read_sites(certs)
    run_config: dict = {"min-nodes": args.min_sites, "node-wait": float(args.node_wait)}
    if args.resume:
        run_dir = Path(args.resume).resolve()
        run_config["resume"] = str(run_dir)
    else:
        overrides = [*args.overrides, *(["secagg.enabled=true"] if args.secure_aggregation else [])]
        cfg = flower_cli.absolute_paths(config_mod.load(args.config, overrides))
        run_config["fedit-config"] = config_mod.to_toml(cfg)
        run_dir = Path(cfg.run.out)
    logs = run_dir.parent / f"{run_dir.name}-server-logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedit-server-") as home:
        env = flower_cli.flwr_env(Path(home))
        conn = {"address": f"127.0.0.1:{args.port}" if args.host in ("0.0.0.0", "::") else f"{args.host}:{args.port}",
                "root-certificates": str((certs / "ca.crt").resolve())}
        flower_cli.write_connection(Path(home), conn)
        log = open(logs / "superlink.log", "w")
        link = subprocess.Popen([_exe("flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"),
                                 "--ssl-certfile", str(certs / "server.crt"), "--ssl-keyfile", str(certs / "server.key"),
                                 "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                                 "--host", args.host, "--port", str(args.port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        try:
            _wait_for_line(logs / "superlink.log", "Uvicorn running", link, 90, "the SuperLink")
            console.print(f"SuperLink listening on {args.host}:{args.port} (TLS, site keys required); log: "
                          f"{logs / 'superlink.log'}")
            if args.host not in ("127.0.0.1", "localhost", "::1"):
                console.print(EXPOSED)
            bindings = {}
            for name, (cid, key) in sorted(sites.items(), key=lambda kv: kv[1][0]):
                node = _register(key, env)
                bindings[str(node)] = cid
                console.print(f"site {name}: client {cid}, key {key.name} registered as SuperNode {node}")
            run_config["bindings"] = json.dumps(bindings)
            run_id, status = flower_cli.launch(run_config, conn, console.print)
        finally:
            _stop(link)
    console.print(f"Flower run {run_id}: {status}")
    if status != "finished:completed":
        raise FeditError(f"the run ended as {status!r}; the SuperLink's log: {logs / 'superlink.log'}")
    from fedit import runner

    console.print(runner.summary(run_dir))


EXPOSED = ("warning: Flower 1.41 serves its Control API (submit and stop runs, register keys) on this same port, "
           "with no login unless Flower's account authentication is set up: anyone who reaches it can run code on "
           "this machine as a Flower app. Let only the sites' addresses reach it (a firewall), and only sites you "
           "trust with that (docs/deployment.md)")


def _register(key: Path, env: dict) -> int:
    done = subprocess.run([flower_cli.flwr_exe(), "supernode", "register", str(key), flower_cli.CONNECTION,
                           "--format", "json"], capture_output=True, text=True, env=env)
    try:
        out = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        out = {}
    if not out.get("success"):
        raise FeditError(f"registering {key} failed: {(out.get('error-message') or done.stderr).strip()[-300:]}")
    return int(out["node-id"])


def _wait_for_line(path: Path, text: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if proc.poll() is not None:
            raise FeditError(f"{what} stopped: {path.read_text(errors='replace').strip()[-800:]}")
        if time.monotonic() > deadline:
            raise FeditError(f"{what} did not start within {timeout:.0f} s; its log: {path}")
        time.sleep(0.5)


# ---------------------------------------------------------------- fedit site

SENDS = ("each round it is picked, this site sends the server: its trained LoRA adapter (the adapter's arrays, "
         "never a record), the number of examples it trained on, and metrics (train_loss, steps, trained_tokens, "
         "seconds, load_seconds, and where they apply examples_shortened and the strategy's own, e.g. prox_ratio; "
         "each message's are printed before it goes); when asked to evaluate: per category of its validation "
         "split, the loss summed over response tokens, the token count and the example count")


def site_command(args: argparse.Namespace, console) -> None:
    from fedit import site
    from fedit.runtime.simulation import ClientStateDir

    say = console.print
    _stop_on_signals()
    data = Path(args.data).expanduser().resolve()
    records, lines = site.check_data(data)  # first: nothing leaves the site before its data passes
    for line in lines:
        say(line)
    key = Path(args.auth_key).expanduser().resolve()
    ca = Path(args.root_certificates).expanduser().resolve()
    for f, what in ((key, "--auth-key"), (ca, "--root-certificates")):
        if not f.is_file():
            raise FeditError(f"{what} {f}: file not found")
    name = args.name or key.stem
    state = Path(args.state).expanduser() if args.state else Path.home() / ".fedit" / "sites" / name
    state.mkdir(parents=True, exist_ok=True)
    secret = site.worker_key(state / "worker.key")
    sock_dir = Path(tempfile.mkdtemp(prefix="fedit-site-"))  # short: a Unix socket path has a length limit
    sock = sock_dir / "worker.sock"
    work = site.SiteWork(data, ClientStateDir(state / "client_state"), args.model or None)
    worker = site.Worker(work, sock, secret, say=lambda line: say(f"[{name}] {line}")).start()
    node_config = (f'data-path="{data}" worker="{sock}" worker-key="{state / "worker.key"}" site="{name}"'
                   + (f' model="{args.model}"' if args.model else "")
                   + (" secure-aggregation=true" if args.secure_aggregation else ""))
    log_path = state / "supernode.log"
    command = [_exe("flower-supernode"), "--root-certificates", str(ca), "--superlink", args.server,
               "--auth-supernode-private-key", str(key), "--port", str(args.port or free_port()),
               "--node-config", node_config]
    say(f"site {name}: {len(records)} records in {data}; state in {state}; SuperNode log {log_path}")
    say(SENDS)
    say(f"joining {args.server}; Ctrl-C stops this site (the same command starts it again where it was)")
    node = None
    try:
        started = time.monotonic()  # of this run of refusals
        while True:
            node, up = _supernode(command, log_path, state), time.monotonic()
            refused = "Failed to activate SuperNode"  # the SuperLink does not accept this key (yet)
            while node.poll() is None and refused not in log_path.read_text(errors="replace"):
                time.sleep(0.5)
            if time.monotonic() - up > 60:  # it had joined: a refusal now (a restarted server) starts a new count
                started = time.monotonic()
            text = log_path.read_text(errors="replace")
            if refused not in text:
                raise FeditError(f"site {name}'s SuperNode stopped (exit {node.returncode}): {text.strip()[-600:]}")
            _stop(node, wait=5)
            if time.monotonic() - started > args.join_timeout:
                raise FeditError(f"the server refused site {name} for {args.join_timeout:g} s: its key {key.name} is "
                                 f"not registered there (send {key.name}.pub to the server operator), or the server "
                                 f"still holds this site's previous session")
            say(f"the server does not accept site {name} yet (its key is unknown there, or its previous session "
                f"has not expired: up to a minute after a crash); trying again in 5 s")
            time.sleep(5)
    except KeyboardInterrupt:
        say(f"stopping site {name} ...")
    finally:
        if node is not None:
            _stop(node, wait=10)
        worker.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
    say(f"site {name} stopped; its state stays in {state}")


def _supernode(command: list[str], log_path: Path, state: Path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env=flower_cli.flwr_env(state / "flwr-home"), start_new_session=True)


COMMANDS = {"certs": certs_command, "server": server_command, "site": site_command}
