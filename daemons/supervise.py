"""`iotctl up` and `iotctl status`: the whole daemon set under supervisord, in a checkout.

`up` writes a supervisord config into <state_dir>/run/, starts supervisord in the
foreground, waits until every program is RUNNING (or says which one is not), prints where
the broker listens, and on Ctrl-C lets supervisord stop the set (SIGTERM, stopwaitsecs)
before it returns. Nothing is reported as started unless supervisord says it runs.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path

from . import config as configmod
from .service import status_file


@dataclass(frozen=True, slots=True)
class Program:
    name: str  # supervisord's program name
    priority: int  # supervisord starts lower numbers first: the broker before its clients
    args: tuple[str, ...] = ()
    exe: str = ""  # "" = name
    unit: str = ""  # the systemd unit, without ".service"; "" = name


# Every daemon that runs once per node. A daemon joins this list in the change that builds it.
PROGRAMS: tuple[Program, ...] = (
    Program("iot-broker", 10),
    Program("iot-ingest", 20),
    Program("iot-transfer-recv", 20),
    Program("iot-transfer-send", 20),
    Program("iot-dbsub", 20),
)


def programs(cfg: configmod.Config, factory: bool = True) -> tuple[Program, ...]:
    """PROGRAMS, iot-ingest-I for each ingest worker past the first, one iot-plc per [[plc.device]] (after iot-dbsub, so that on a first start its
    subscription is there before the first reading) and, with `factory`, the factory: its devices
    (one process for all, or one per device: [factory] processes), controller, observer, dashboard."""
    plcs = tuple(Program(f"iot-plc-{d.name}", 30, ("--plc", d.name), exe="iot-plc", unit=f"iot-plc@{d.name}")
                 for d in cfg.plc.device)
    # Ingest workers past the first ([ingest] workers); iot-ingest itself is worker 1.
    plcs = tuple(Program(f"iot-ingest-{i}", 20, ("--worker", str(i)), exe="iot-ingest", unit=f"iot-ingest@{i}")
                 for i in range(2, cfg.ingest.workers + 1)) + plcs
    if not factory:
        return PROGRAMS + plcs
    fc = cfg.factory
    names = ["all"] if fc.processes == "one" else [d.name for d in fc.device]
    devices = tuple(Program(f"iot-device-{n}", 30, ("--device", n), exe="iot-device", unit=f"iot-device@{n}")
                    for n in names)
    return PROGRAMS + plcs + devices + (Program("iot-controller", 30), Program("iot-observer", 30),
                                        Program("iot-dashboard", 30))

START_TIMEOUT = 30.0


def _bin(name: str) -> str:
    # Console scripts live beside the interpreter in a venv; fall back to PATH.
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def _rundir(cfg: configmod.Config) -> Path:
    return cfg.paths.state_dir / "run"


def render(cfg: configmod.Config, programs: tuple[Program, ...]) -> str:
    run = _rundir(cfg)
    logs = cfg.paths.state_dir / "log"
    conf_arg = f" --config {cfg.source}" if cfg.source else ""
    lines = [
        "[unix_http_server]", f"file={run / 'supervisor.sock'}", "chmod=0700", "",
        "[supervisord]", f"logfile={logs / 'supervisord.log'}", f"pidfile={run / 'supervisord.pid'}",
        "nodaemon=true", "loglevel=info", "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
        "[supervisorctl]", f"serverurl=unix://{run / 'supervisor.sock'}", "",
    ]
    for p in programs:
        lines += [
            f"[program:{p.name}]",
            f"command={_bin(p.exe or p.name)}{conf_arg}{''.join(' ' + a for a in p.args)}",
            f"priority={p.priority}",
            "autostart=true", "autorestart=true", "startsecs=1", "startretries=10",
            "stopsignal=TERM", "stopwaitsecs=15", "stopasgroup=true", "killasgroup=true",
            "redirect_stderr=true", f"stdout_logfile={logs / (p.name + '.log')}",
            "stdout_logfile_maxbytes=10MB", "stdout_logfile_backups=3", "",
        ]
    return "\n".join(lines)


def rpc(cfg: configmod.Config):
    from supervisor.xmlrpc import SupervisorTransport  # noqa: PLC0415

    sock = _rundir(cfg) / "supervisor.sock"
    transport = SupervisorTransport(None, None, f"unix://{sock}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def _states(cfg: configmod.Config) -> dict[str, str]:
    return {p["name"]: p["statename"] for p in rpc(cfg).supervisor.getAllProcessInfo()}


def cmd_up(args: argparse.Namespace, log) -> int:
    cfg = configmod.load(args.config)
    progs = programs(cfg, factory=not args.no_factory)
    run, logs = _rundir(cfg), cfg.paths.state_dir / "log"
    (run / "status").mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    conf = run / "supervisord.conf"
    conf.write_text(render(cfg, progs))
    # supervisord gets Ctrl-C from the terminal too; we only wait for it to finish the stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    proc = subprocess.Popen([_bin("supervisord"), "-c", str(conf)], start_new_session=False)
    signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    ok = _wait_running(cfg, proc, log)
    if ok:
        print(f"iot-daemons running under supervisord ({len(progs)} programs); logs in {logs}")
        print(f"  broker: mqtt://{_display_host(cfg.broker.host)}:{cfg.broker.port}")
        conf_arg = f" --config {cfg.source}" if cfg.source else ""
        print(f"  PLC readings as they are stored: iotctl readings --follow{conf_arg}")
        if not args.no_factory:
            print(f"  factory dashboard: http://{_display_host(cfg.factory.dashboard_host)}:{cfg.factory.dashboard_port}/")
        print("  stop: Ctrl-C    state: iotctl status", flush=True)
    else:
        proc.send_signal(signal.SIGTERM)
    rc = proc.wait()
    return 0 if ok else (rc or 69)


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _wait_running(cfg: configmod.Config, proc: subprocess.Popen, log) -> bool:
    deadline = time.monotonic() + START_TIMEOUT
    states: dict[str, str] = {}
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            states = _states(cfg)
        except (OSError, xmlrpc.client.Fault):
            states = {}
        if states and all(s == "RUNNING" for s in states.values()):
            return True
        bad = [n for n, s in states.items() if s in ("FATAL", "EXITED")]
        if bad:
            print(f"iotctl up: {', '.join(bad)} failed to start; see {cfg.paths.state_dir / 'log'}", file=sys.stderr)
            return False
        time.sleep(0.2)
    print(f"iotctl up: not all programs running after {START_TIMEOUT:g}s: {states}", file=sys.stderr)
    return False


def _systemd_states(cfg: configmod.Config) -> list[tuple[str, str, str]]:
    names = [(p.unit or p.name) + ".service" for p in programs(cfg)]
    r = subprocess.run(["systemctl", "show", "-p", "Id,ActiveState,SubState,StatusText,UnitFileState", *names],
                       capture_output=True, text=True, timeout=30)
    rows = []
    for block in r.stdout.strip().split("\n\n"):
        f = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        # Units this node does not run (the factory without install.sh --factory) are not listed.
        if f.get("UnitFileState") not in ("enabled", "enabled-runtime") and f.get("ActiveState") == "inactive":
            continue
        if f.get("Id"):
            rows.append((f["Id"].removesuffix(".service"), f"{f['ActiveState']}/{f['SubState']}",
                         f.get("StatusText", "")))
    return rows


RUNNING = ("RUNNING", "active/running")  # a running daemon's state, to supervisord and to systemd


def status_rows(cfg: configmod.Config) -> list[tuple[str, str, str]] | None:
    """(name, state, detail) of every daemon: from this config's supervisord if it runs, else
    from systemd; None if neither runs. `iotctl status` and the dashboard's Node view."""
    try:
        return [(p["name"], p["statename"], _detail(cfg, p)) for p in rpc(cfg).supervisor.getAllProcessInfo()]
    except OSError:
        return _systemd_states(cfg) if Path("/run/systemd/system").is_dir() else None


def _detail(cfg: configmod.Config, info: dict) -> str:
    """A running program's last STATUS= line (service.py writes it under supervisord), as
    systemctl shows it; else supervisord's description (pid, uptime or why it stopped)."""
    if info["statename"] == "RUNNING":
        try:
            f = status_file(cfg, info["name"])
            if f.stat().st_mtime >= info["start"]:  # not a line a previous run left
                return f"{info['description']}; {f.read_text().strip()}"
        except OSError:
            pass
    return info["description"]


def cmd_status(args: argparse.Namespace, log) -> int:
    """Every daemon's state: from this config's supervisord if it runs, else from systemd."""
    cfg = configmod.load(args.config)
    rows = status_rows(cfg)
    if rows is None:
        print("iotctl status: neither supervisord (no socket at "
              f"{_rundir(cfg) / 'supervisor.sock'}) nor systemd is running", file=sys.stderr)
        return 3
    ok = bool(rows) and all(state in RUNNING for _, state, _ in rows)
    width = max((len(name) for name, _, _ in rows), default=4)
    for name, state, detail in rows:
        print(f"{name:<{width}}  {state:<14} {detail}")
    return 0 if ok else 3


def add_commands(sub) -> None:
    p = sub.add_parser("up", help="run the whole daemon set in the foreground under supervisord",
                       description="Run every daemon under supervisord with this checkout's etc/ and var/, the "
                                   "simulated factory and its dashboard included.")
    p.add_argument("--config", metavar="FILE")
    p.add_argument("--no-factory", action="store_true",
                   help="leave out the simulated factory (iot-device, iot-controller, iot-observer, iot-dashboard)")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("status", help="show each daemon's state",
                       description="Show every daemon's state (exit 0 if all run, 3 otherwise, like systemctl).")
    p.add_argument("--config", metavar="FILE")
    p.set_defaults(func=cmd_status)
