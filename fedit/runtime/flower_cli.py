"""`fedit flower run`: launch a fedit run on a Flower SuperLink and follow it to the end.

One command instead of four: it validates the fedit config where it is typed,
packs fedit's code (no data, no weights) into a Flower app, submits it with
``flwr run`` to the SuperLink, streams the server's log lines, and waits for
the run's final status, because ``flwr run`` itself returns at submission and
exits 0 even when the app fails. The exit code is 0 only for a completed run.

It talks to the SuperLink only through the ``flwr`` command line (a private
FLWR_HOME holds the one connection it needs), so nothing here imports flwr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedit.errors import FeditError

CONNECTION = "fedit"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("flower", help="run on Flower: a SuperLink and one SuperNode per client machine")
    sub = p.add_subparsers(dest="flower_command", required=True)
    r = sub.add_parser("run", help="launch a fedit run on a Flower SuperLink and wait for it (docs/flower.md)",
                       description="Launch a fedit run on a Flower SuperLink; the server side writes the run "
                                   "directory (run.out) on the SuperLink's machine. Exit code 0 only if it completed.")
    r.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address (its --port)")
    tls = r.add_mutually_exclusive_group(required=True)
    tls.add_argument("--root-certificates", metavar="CA.pem", help="CA certificate that signed the SuperLink's TLS certificate")
    tls.add_argument("--insecure", action="store_true", help="no TLS (only for a SuperLink started with --insecure)")
    r.add_argument("--config", default=None, help="the TOML config file, as for `fedit run`")
    r.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run (a path on the server)")
    r.add_argument("--min-nodes", type=int, default=0,
                   help="wait for this many SuperNodes before round 1 (default: every client of data.clients_dir's "
                        "manifest if the server has it, else federation.clients_per_round)")
    r.add_argument("--node-wait", type=float, default=600.0, help="seconds to wait for them (default 600)")
    r.add_argument("--simulation", type=int, default=0, metavar="N",
                   help="the SuperLink runs Flower's simulation runtime (flower-superlink --simulation) with N "
                        "virtual SuperNodes: virtual node i is client i, its data from data.clients_dir")
    r.add_argument("--secure-aggregation", action="store_true",
                   help="the server learns only the sum of each round's client changes (Flower's SecAgg+; "
                        "the [secagg] table of --help-config); the same as secagg.enabled=true")
    r.add_argument("--quiet", action="store_true", help="do not stream the server's log")
    r.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def main(args: argparse.Namespace, console) -> None:
    from fedit import config as config_mod

    if args.resume and (args.config or args.overrides or args.secure_aggregation):
        raise FeditError("--resume continues a run with the config saved in its directory; "
                         "leave out --config, --secure-aggregation and key=value overrides")
    run_config: dict = {"min-nodes": args.min_nodes, "node-wait": float(args.node_wait)}
    if args.resume:
        run_config["resume"] = str(Path(args.resume).resolve())
    else:
        overrides = [*args.overrides, *(["secagg.enabled=true"] if args.secure_aggregation else [])]
        cfg = absolute_paths(config_mod.load(args.config, overrides))
        run_config["fedit-config"] = config_mod.to_toml(cfg)
    conn = {"address": args.superlink}
    if args.insecure:
        conn["insecure"] = True
    else:
        ca = Path(args.root_certificates)
        if not ca.is_file():
            raise FeditError(f"--root-certificates {ca}: file not found; pass the CA certificate (ca.crt) that signed "
                             f"the SuperLink's certificate")
        conn["root-certificates"] = str(ca.resolve())
    if args.simulation:
        conn["options"] = {"num-supernodes": args.simulation}
    say = (lambda line: None) if args.quiet else (lambda line: console.print(line))
    run_id, status = launch(run_config, conn, say)
    console.print(f"Flower run {run_id}: {status}")
    if status != "finished:completed":
        raise FeditError(f"the Flower run {run_id} ended as {status!r}; its full log: "
                         f"`flwr log {run_id} <superlink> --show`")


def absolute_paths(cfg):
    """Paths typed on this machine, made absolute for the ServerApp (another process, another cwd)."""
    d, m, r = cfg.data, cfg.model, cfg.run
    data = {}
    for key in ("clients_dir", "test_file"):
        value = getattr(d, key)
        if value:
            data[key] = str(Path(value).expanduser().resolve())
    model = {}
    if Path(m.name).expanduser().exists():
        model["name"] = str(Path(m.name).expanduser().resolve())
    return cfg.replace(data=data, model=model, run={"out": str(Path(r.out).expanduser().resolve())})


def flwr_env(home: Path) -> dict:
    # PYTHONUNBUFFERED: Flower's commands print with Python's defaults, block-buffered into a pipe, so without it
    # `flwr log --stream` hands the server's lines on in 8 KB chunks, a minute or more after they were logged
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "COLUMNS": "200", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
    bindir = str(Path(sys.executable).parent)  # flwr's own commands (flower-superexec, ...) live beside python
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def flwr_exe() -> str:
    exe = Path(sys.executable).parent / "flwr"
    if exe.exists():
        return str(exe)
    found = shutil.which("flwr")
    if not found:
        raise FeditError("the `flwr` command is not installed; pip install 'fedit[flower]'")
    return found


def write_app(target: Path) -> Path:
    """A Flower app directory: pyproject.toml with the [tool.flwr.app] sections, and fedit's .py files."""
    import fedit

    src = Path(fedit.__file__).parent
    (target / "fedit").mkdir(parents=True)
    for py in src.rglob("*.py"):
        if "__pycache__" in py.parts:
            continue
        dst = target / "fedit" / py.relative_to(src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(py, dst)
    (target / "pyproject.toml").write_text(f"""[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedit"
version = "{fedit.__version__}"
description = "fedit on Flower: federated instruction tuning with LoRA"
license = {{ text = "Apache-2.0" }}
dependencies = []  # fedit[flower] is installed on every machine; the SuperLink runs with --disable-runtime-dependency-installation

[tool.flwr.app]
publisher = "fedit"
fab-include = ["fedit/**/*.py"]

[tool.flwr.app.components]
serverapp = "fedit.runtime.flower:server_app"
clientapp = "fedit.runtime.flower:client_app"

[tool.flwr.app.config]
fedit-config = ""
resume = ""
min-nodes = 0
node-wait = 600.0
bindings = ""
""")
    return target


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml_value(x)}' for k, x in v.items()) + " }"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def write_connection(home: Path, conn: dict) -> None:
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in conn.items()]
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def launch(run_config: dict, conn: dict, say=print, poll: float = 2.0) -> tuple[int, str]:
    """Submit the app with `flwr run`, follow its log, wait for its final status; return (run id, status)."""
    flwr = flwr_exe()
    with tempfile.TemporaryDirectory(prefix="fedit-flower-") as tmp:
        tmp = Path(tmp)
        home = tmp / "flwr-home"
        home.mkdir()
        write_connection(home, conn)
        app = write_app(tmp / "app")
        rc = tmp / "run-config.toml"
        rc.write_text("".join(f'"{k}" = {_toml_value(v)}\n' for k, v in run_config.items()))
        env = flwr_env(home)
        done = subprocess.run([flwr, "run", str(app), CONNECTION, "--run-config", str(rc), "--format", "json"],
                              capture_output=True, text=True, env=env)
        try:
            out = json.loads(done.stdout[done.stdout.index("{"):])
        except ValueError:
            out = {}
        if done.returncode != 0 or not out.get("success"):
            raise FeditError(f"`flwr run` could not submit the run to {conn['address']}: "
                             f"{(out.get('error-message') or done.stderr or done.stdout).strip()[-800:]}")
        run_id = int(out["run-id"])
        say(f"submitted Flower run {run_id} to {conn['address']}")
        logs = subprocess.Popen([flwr, "log", str(run_id), CONNECTION, "--stream"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
        reader = threading.Thread(target=_follow, args=(logs, say), daemon=True)
        reader.start()
        try:
            status = wait(run_id, env, flwr, poll)
        except KeyboardInterrupt:
            subprocess.run([flwr, "stop", str(run_id), CONNECTION], capture_output=True, env=env)
            raise
        finally:
            time.sleep(1.0)  # the last log lines
            if logs.poll() is None:
                logs.terminate()
                try:
                    logs.wait(10)
                except subprocess.TimeoutExpired:
                    logs.kill()
                    logs.wait()
            reader.join(5)
        return run_id, status


def _follow(proc: subprocess.Popen, say) -> None:
    noise = ("httpx:", "HTTP Request", "Starting logstream", "Using SuperLink", "Loading weights", "warnings.warn",
             "FutureWarning")
    for line in proc.stdout:
        line = re.sub(r"\x1b\[[0-9;]*m", "", line).rstrip()
        if line and not any(n in line for n in noise):
            say(line)


def run_status(run_id: int, env: dict, flwr: str | None = None) -> str:
    done = subprocess.run([flwr or flwr_exe(), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
                          capture_output=True, text=True, env=env)
    try:
        runs = json.loads(done.stdout[done.stdout.index("{"):]).get("runs", [])
    except ValueError:
        return "unknown"
    return runs[0]["status"] if runs else "unknown"


def wait(run_id: int, env: dict, flwr: str, poll: float) -> str:
    unknown = 0
    while True:
        status = run_status(run_id, env, flwr)
        if status.startswith("finished"):
            return status
        unknown = unknown + 1 if status == "unknown" else 0
        if unknown >= 30:
            raise FeditError(f"lost the SuperLink while waiting for Flower run {run_id}")
        time.sleep(poll)
