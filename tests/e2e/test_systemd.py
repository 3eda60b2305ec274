"""The system install under a real systemd, as the README's install and operations sections say.

A Debian bookworm root (debootstrap, cached in /var/cache/iot-test) is booted with
`systemd-nspawn -b --volatile=overlay --private-network`, so every run starts from the same
clean system and nothing reaches the host's ports. pip inside cannot reach the registry, so the
wheels are prepared on the host (`install.sh --make-wheelhouse`) and installed with
`install.sh --wheelhouse`. The first run builds the root (a few minutes); later runs take
seconds. Needs root, debootstrap and systemd-container (`install.sh --local --test-deps`).

How the container is found and waited for (each step an event, each bounded):

- its init: systemd-nspawn first forks a helper that is still in the host's pid namespace and
  lives for a few milliseconds (longer with a cold page cache); the container's init is the
  descendant of systemd-nspawn that is PID 1 in a pid namespace of its own. Taking the first
  child instead sends every later `nsenter` to a process that is gone.
- its boot: `systemctl is-system-running --wait` inside, until it says running or degraded
  (no start job left). On a timeout the error carries `systemctl list-jobs`,
  `systemctl --failed` and the console, which `--console=read-only` writes to console.log as
  it happens (`--console=passive` kept it in an unread pty until the container stopped).

Whatever Container starts it stops, also when its own start fails.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support import ROOT, wait_for

CACHE = Path("/var/cache/iot-test")
ROOTFS = CACHE / "bookworm"
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,procps"
UNITS = ("iot-broker", "iot-transfer-recv", "iot-transfer-send", "iot-ingest", "iot-dbsub", "iot-plc@line1")
BOOT_TIMEOUT = 120.0
CONSOLE_TAIL = 8000

pytestmark = [pytest.mark.systemd, pytest.mark.slow, pytest.mark.timeout(900)]


def build_rootfs() -> None:
    if (ROOTFS / "usr/bin/python3").exists():
        return
    tmp = CACHE / "bookworm.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(tmp)],
                   check=True, stdout=subprocess.DEVNULL, timeout=900)
    tmp.rename(ROOTFS)  # only a complete root is ever cached


def clean_checkout(dest: Path) -> None:
    """The files a clone would have (tracked plus new, not ignored): no .venv, no var/ state."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.split(b"\0")
    for f in filter(None, files):
        src = ROOT / f.decode()
        if src.is_file():
            (dest / f.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f.decode())


# -- host processes ------------------------------------------------------------------------------


def ppid_of(pid: int) -> int | None:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def nspids(pid: int) -> list[int]:
    """/proc/PID/status NSpid: the pid in each pid namespace, the host's first, its own last."""
    try:
        for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    except OSError:
        pass
    return []


def descends_from(pid: int, ancestor: int, depth: int = 64) -> bool:
    for _ in range(depth):
        if pid == ancestor:
            return True
        parent = ppid_of(pid)
        if parent is None or parent <= 1:
            return False
        pid = parent
    return False


def host_pids() -> list[int]:
    return [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()]


class Container:
    def __init__(self, src: Path, wheels: Path, log: Path):
        self.log_path = log
        self.log = open(log, "wb")  # noqa: SIM115 - closed by stop()
        self.pid: int | None = None
        self.last_state = "(not asked yet)"
        self.nspawn = subprocess.Popen(
            ["systemd-nspawn", "-D", str(ROOTFS), "-b", "--register=no", "--keep-unit", "--volatile=overlay",
             "--private-network", "--console=read-only", f"--bind-ro={src}:/src", f"--bind-ro={wheels}:/wheels"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self.pid = wait_for(self._init_pid, 30, interval=0.02,
                                what="the container's init (the descendant of systemd-nspawn that is PID 1 "
                                     "in its own pid namespace)")
            self._wait_booted(BOOT_TIMEOUT)
        except BaseException:
            self.stop()  # nothing started here outlives a failed start
            raise

    def _init_pid(self) -> int | None:
        if self.nspawn.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited {self.nspawn.returncode}:\n{self.console()}")
        for pid in host_pids():
            ns = nspids(pid)
            if len(ns) >= 2 and ns[-1] == 1 and descends_from(pid, self.nspawn.pid, depth=3):
                return pid
        return None

    def _wait_booted(self, timeout: float) -> None:
        """Until PID 1 says the boot transaction is done: `is-system-running --wait` blocks in
        PID 1 until then; it is asked again only while PID 1's bus is not up yet (offline)."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.2) + 10):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {self.nspawn.returncode} during the boot:\n"
                                   + self.console())
            try:
                r = self.sh("systemctl is-system-running --wait", check=False, timeout=left)
            except subprocess.TimeoutExpired:
                break
            self.last_state = (r.stdout.strip() or "(no output)") + (f" / {r.stderr.strip()}" if r.stderr else "")
            if r.stdout.strip() in ("running", "degraded"):
                return
            if r.stdout.strip() in ("maintenance", "stopping"):
                raise RuntimeError(f"the container's boot ended in {r.stdout.strip()}:\n" + self.diagnose())
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout}s waiting for the container's boot to finish "
                           f"(systemctl is-system-running --wait: running or degraded, i.e. no start job "
                           f"left); last answer: {self.last_state}\n" + self.diagnose())

    def console(self) -> str:
        self.log.flush()
        text = re.sub(r"\x1b\[[0-9;]*m|\r", "", self.log_path.read_bytes().decode(errors="replace"))
        return f"--- console ({self.log_path}), last {CONSOLE_TAIL} characters:\n{text[-CONSOLE_TAIL:]}"

    def diagnose(self) -> str:
        """What the container is doing: its jobs, its failed units, its console."""
        nspawn = "running" if self.nspawn.poll() is None else f"exited {self.nspawn.returncode}"
        out = [f"--- systemd-nspawn pid {self.nspawn.pid}, {nspawn}; init pid {self.pid}"]
        if self.pid is not None:
            for cmd in ("systemctl list-jobs --no-pager", "systemctl --failed --no-pager"):
                try:
                    r = self.sh(cmd, check=False, timeout=15)
                    out.append(f"--- {cmd} (exit {r.returncode}):\n{r.stdout}{r.stderr}")
                except subprocess.TimeoutExpired:
                    out.append(f"--- {cmd}: no answer within 15 s")
        out.append(self.console())
        return "\n".join(out)

    def sh(self, command: str, check: bool = True, timeout: float = 300,
           input: str | None = None) -> subprocess.CompletedProcess:
        assert self.pid is not None, "the container has no init yet"
        r = subprocess.run(["nsenter", "-t", str(self.pid), "-a", "sh", "-c", command], check=False,
                           capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"`{command}` exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def host_pid(self, pid: int) -> int:
        """The host's pid of the container's process `pid` (as `systemctl show -p MainPID` says it)."""
        assert self.pid is not None
        found = [h for h in host_pids() if (ns := nspids(h)) and len(ns) >= 2 and ns[-1] == pid
                 and descends_from(h, self.pid)]
        assert len(found) == 1, f"container pid {pid}: host pids {found}"
        return found[0]

    def _init_is_ours(self) -> bool:
        return (self.pid is not None and self.nspawn.poll() is None and nspids(self.pid)[-1:] == [1]
                and descends_from(self.pid, self.nspawn.pid, depth=3))

    def stop(self) -> None:
        """Power off; if that does not end it, ask systemd-nspawn to halt it (SIGTERM); if that does
        not either, SIGKILL the container's init (which ends its pid namespace) and systemd-nspawn."""
        try:
            if self.nspawn.poll() is None:
                asked = False
                if self._init_is_ours():
                    try:
                        asked = self.sh("systemctl poweroff", check=False, timeout=30).returncode == 0
                    except subprocess.TimeoutExpired:
                        pass
                for sig, wait in ((None, 30.0 if asked else 0.0), (signal.SIGTERM, 20.0)):
                    if sig is not None:
                        self.nspawn.send_signal(sig)
                    try:
                        self.nspawn.wait(wait)
                        break
                    except subprocess.TimeoutExpired:
                        continue
                else:
                    if self._init_is_ours():
                        os.kill(self.pid, signal.SIGKILL)
                    self.nspawn.kill()
                    self.nspawn.wait(10)
        finally:
            self.log.close()


@pytest.fixture(scope="module")
def container(tmp_path_factory) -> Iterator[Container]:
    if os.geteuid() != 0 or not shutil.which("systemd-nspawn") or not shutil.which("debootstrap"):
        pytest.fail("needs root, systemd-nspawn and debootstrap: run ./install.sh --local --test-deps as root")
    build_rootfs()
    work = tmp_path_factory.mktemp("systemd")
    src, wheels = work / "src", work / "wheels"
    clean_checkout(src)
    made = subprocess.run([str(src / "install.sh"), "--make-wheelhouse", str(wheels)], check=False,
                          capture_output=True, text=True, timeout=600)
    if made.returncode != 0:
        pytest.fail(f"install.sh --make-wheelhouse exited {made.returncode}:\n{made.stdout}\n{made.stderr}")
    c = Container(src, wheels, work / "console.log")
    try:
        c.sh("cp -r /src /root/iot-daemons")
        yield c
    finally:
        c.stop()


# -- helpers inside the container -------------------------------------------------------------------


def state(c: Container, unit: str) -> str:
    return c.sh(f"systemctl is-active {unit}", check=False).stdout.strip()


def active(c: Container, unit: str) -> bool:
    return state(c, unit) == "active"


def main_pid(c: Container, unit: str) -> int:
    return int(c.sh(f"systemctl show -p MainPID --value {unit}").stdout)


def n_restarts(c: Container, unit: str) -> int:
    return int(c.sh(f"systemctl show -p NRestarts --value {unit}").stdout)


def status(c: Container, unit: str) -> str:
    return c.sh(f"systemctl status {unit} --no-pager -n 30", check=False).stdout


def wait_active(c: Container, unit: str, timeout: float = 60, not_pid: int | None = None) -> int:
    """Until `unit` is active (READY=1 arrived) with a main pid other than `not_pid`; its main pid.
    A unit that fails on the way ends the wait at once."""
    def up() -> int | None:
        s = state(c, unit)
        if s == "failed":
            raise AssertionError(f"{unit} failed:\n{status(c, unit)}")
        if s != "active":
            return None
        pid = main_pid(c, unit)
        return pid if pid not in (0, not_pid) else None
    try:
        return wait_for(up, timeout, interval=0.2, what=f"{unit} active" + (f" with a main pid other than {not_pid}"
                                                                           if not_pid else ""))
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{status(c, unit)}") from None


def journal_cursor(c: Container) -> str:
    """Where the journal ends now: later entries are read with --after-cursor."""
    out = c.sh("journalctl -n 1 -o json --no-pager").stdout.strip().splitlines()
    return json.loads(out[-1])["__CURSOR"]


PRIORITIES = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7}


def journal(c: Container, unit: str, cursor: str, priority: str | None = None) -> str:
    """The messages of `unit` (its own and systemd's about it) after `cursor`, at `priority` or
    more severe. Filtered here, not with -u/-p: journalctl 252's --after-cursor skips one entry
    too many when the cursor's entry does not match the filter, i.e. the first line asked for."""
    name = unit if "." in unit else f"{unit}.service"
    most = PRIORITIES[priority] if priority else 7
    lines = []
    for raw in c.sh(f"journalctl --after-cursor='{cursor}' -o json --no-pager").stdout.splitlines():
        e = json.loads(raw)
        if name not in (e.get("_SYSTEMD_UNIT"), e.get("UNIT")) or int(e.get("PRIORITY", 6)) > most:
            continue
        msg = e.get("MESSAGE", "")
        lines.append(bytes(msg).decode(errors="replace") if isinstance(msg, list) else str(msg))
    return "\n".join(lines)


def wait_journal(c: Container, unit: str, cursor: str, *needles: str, timeout: float = 30) -> str:
    """The first line of `unit` after `cursor` that contains every needle (case-insensitive)."""
    def line() -> str | None:
        for ln in journal(c, unit, cursor).splitlines():
            if all(n.lower() in ln.lower() for n in needles):
                return ln
        return None
    try:
        return wait_for(line, timeout, interval=0.2, what=f"a line with {needles} in the journal of {unit}")
    except TimeoutError as e:
        raise AssertionError(f"{e}; its lines since:\n{journal(c, unit, cursor)}") from None


def with_log_level(text: str, level: str) -> str:
    """The config text with `[log] level = "<level>"` set: the (possibly commented) key in an
    existing [log] section replaced, or a [log] section added."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == "[log]"), None)
    if start is None:
        return text.rstrip("\n") + f'\n\n[log]\nlevel = "{level}"\n'
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
    for i in range(start + 1, end):
        if re.match(r"\s*#?\s*level\s*=", lines[i]):
            lines[i] = f'level = "{level}"'
            break
    else:
        lines.insert(start + 1, f'level = "{level}"')
    return "\n".join(lines) + "\n"


# -- the tests -----------------------------------------------------------------------------------------


def test_install_start_and_operate_as_the_readme_says(container):
    c = container
    out = c.sh("cd /root/iot-daemons && ./install.sh --wheelhouse /wheels --start").stdout
    assert "==> installed" in out and "started" in out
    for u in UNITS:
        # `systemctl start iot.target` waits for the broker only (After=); the rest come up
        # beside it. Type=notify: active means READY=1 arrived.
        wait_active(c, u)
        assert c.sh(f"systemctl show -p StatusText --value {u}").stdout.strip(), status(c, u)
    for u in UNITS:  # none of them got there through a crash and a restart
        assert n_restarts(c, u) == 0, status(c, u)
    assert c.sh("systemctl show -p User --value iot-broker").stdout.strip() == "iot"
    assert c.sh("stat -c '%a %U' /etc/iot/ingest.keys").stdout.split() == ["600", "iot"]
    # Authentication is on: the local daemons log in as iot-local (the file transfer below
    # shows it), an anonymous client is refused with CONNACK 5 (not authorised).
    assert c.sh("stat -c '%a %U %G' /etc/iot/passwd /etc/iot/mqtt.secret").stdout.split() == \
        ["640", "root", "iot"] * 2
    anonymous = ("import socket; s = socket.create_connection(('127.0.0.1', 1883)); "
                 "s.sendall(bytes.fromhex('101000044d5154540402003c000461626364')); print(s.recv(4).hex())")
    assert c.sh(f'/opt/iot/bin/python -c "{anonymous}"').stdout.strip() == "20020005"
    assert "login refused" in c.sh("journalctl -u iot-broker --no-pager -o cat").stdout

    st = c.sh("/opt/iot/bin/iotctl status", check=False)
    assert st.returncode == 0, st.stdout + st.stderr
    assert all(u in st.stdout for u in UNITS) and st.stdout.count("active/running") == len(UNITS), st.stdout
    # The simulated factory is installed but runs only with install.sh --factory: not listed.
    assert "iot-dashboard" not in st.stdout and c.sh("test -e /etc/systemd/system/iot-dashboard.service").returncode == 0

    # journalctl -u iot-ingest shows the worker's lines
    assert "ready" in c.sh("journalctl -u iot-ingest --no-pager -o cat").stdout

    # the PLC walkthrough: the QoS 1 handshake in the PLC's and the subscriber's journals, and
    # the readings in the database
    wait_for(lambda: "PUBACK received: the broker has the reading" in
             c.sh("journalctl -u iot-plc@line1 --no-pager -o cat").stdout, 60, interval=0.5, what="a PUBACK")
    wait_for(lambda: "reading stored; PUBACK sent after commit device=line1" in
             c.sh("journalctl -u iot-dbsub --no-pager -o cat").stdout, 60, interval=0.5, what="a stored reading")
    r = c.sh("/opt/iot/bin/iotctl readings --last 1")
    assert "  line1  seq=" in r.stdout and " C  pressure=" in r.stdout, r.stdout

    # a file dropped into the outbox arrives in the spool, byte for byte
    c.sh("head -c 3000000 /dev/urandom > /root/f.bin && cp /root/f.bin /var/lib/iot/outbox/.f.tmp "
         "&& mv /var/lib/iot/outbox/.f.tmp '/var/lib/iot/outbox/field data.bin'")
    wait_for(lambda: c.sh("cmp /root/f.bin '/var/lib/iot/transfer/field data.bin'", check=False).returncode == 0,
             60, interval=0.5, what="file in /var/lib/iot/transfer")
    # ... and the sender, once the receiver confirmed it, moves it to sent/ (after_send = "move")
    wait_for(lambda: c.sh("cmp /root/f.bin '/var/lib/iot/outbox/sent/field data.bin'", check=False).returncode == 0,
             60, interval=0.5, what="the sent file in /var/lib/iot/outbox/sent")

    # a second run changes nothing, and restarts nothing
    pids = {u: main_pid(c, u) for u in UNITS}
    again = c.sh("cd /root/iot-daemons && ./install.sh --wheelhouse /wheels --start").stdout
    assert "nothing changed" in again, again
    assert {u: main_pid(c, u) for u in UNITS} == pids


FACTORY_UNITS = ("iot-device@all", "iot-controller", "iot-observer", "iot-dashboard")
NODE_VIEW = r"""
import json, sys, time
from websockets.sync.client import connect
with connect("ws://127.0.0.1:8080/ws", origin="http://127.0.0.1:8080", open_timeout=30) as ws:
    end = time.time() + 60
    while time.time() < end:
        for ev in json.loads(ws.recv(timeout=60)):
            node = ev.get("node") if "node" in ev else (ev if ev.get("t") == "node" else None)
            rows = (node or {}).get("daemons", {}).get("rows")
            if rows:
                print(json.dumps(rows))
                sys.exit(0)
sys.exit("no Node view in 60 s")
"""


def test_factory_install_runs_under_the_acl_and_its_dashboard_sees_the_node(container):
    """install.sh --factory: the factory's units start, the broker's ACL holds against the bad
    actor, and the dashboard's Node view (systemctl from inside its sandbox) lists every unit."""
    c = container
    out = c.sh("cd /root/iot-daemons && ./install.sh --wheelhouse /wheels --factory --start").stdout
    assert "enabled iot-device@all" in out, out
    for u in FACTORY_UNITS:
        wait_active(c, u)
    r = c.sh("/opt/iot/bin/iotctl bad-actor", check=False)
    assert r.returncode == 0 and "every attempt was refused" in r.stdout, r.stdout + r.stderr
    assert "denied PUBLISH from bad-actor" in c.sh("journalctl -u iot-broker --no-pager -o cat").stdout
    wait_for(lambda: "factory/telemetry/press/temperature q0" in
             c.sh("journalctl -u iot-observer --no-pager -o cat").stdout, 60, interval=0.5, what="the observer's lines")
    c.sh(f"cat > /root/node_view.py <<'EOF'\n{NODE_VIEW}\nEOF")
    rows = json.loads(c.sh("/opt/iot/bin/python /root/node_view.py").stdout)
    states = {r["name"]: r["state"] for r in rows}
    assert all(states.get(u) == "active/running" for u in (*UNITS, *FACTORY_UNITS)), states
    st = c.sh("/opt/iot/bin/iotctl status").stdout
    assert st.count("active/running") == len(UNITS) + len(FACTORY_UNITS), st
    again = c.sh("cd /root/iot-daemons && ./install.sh --wheelhouse /wheels --factory --start").stdout
    assert "nothing changed" in again, again


def test_kill_9_of_a_main_pid_brings_the_daemon_back(container):
    c = container
    pid, restarts = main_pid(c, "iot-broker"), n_restarts(c, "iot-broker")
    cursor = journal_cursor(c)
    c.sh(f"kill -9 {pid}")
    wait_active(c, "iot-broker", 30, not_pid=pid)
    assert n_restarts(c, "iot-broker") == restarts + 1
    wait_journal(c, "iot-broker", cursor, "main process exited", "status=9/KILL")
    wait_journal(c, "iot-broker", cursor, "failed with result 'signal'")


TRACER = r"""
import ctypes, os, select, sys, threading
PTRACE_SEIZE, PTRACE_INTERRUPT, WALL = 0x4206, 0x4207, 0x40000000
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
tid, hold = int(sys.argv[1]), float(sys.argv[2])
for req in (PTRACE_SEIZE, PTRACE_INTERRUPT):  # on this one thread only: its siblings run on
    if libc.ptrace(req, tid, None, None) != 0:
        sys.exit(f"ptrace({req:#x}, {tid}): {os.strerror(ctypes.get_errno())}")
_, st = os.waitpid(tid, WALL)  # the stop, reported to its tracer
print("stopped" if os.WIFSTOPPED(st) else f"not stopped: status {st:#x}", flush=True)

def release():  # exiting ends the trace, and a thread still stopped runs on
    select.select([sys.stdin], [], [], hold)  # until the test closes stdin, or `hold` s
    os._exit(0)

threading.Thread(target=release, daemon=True).start()
# The thread stays stopped while this process holds the trace. Once the process is killed, its
# exit is reported to us first: reap it so that its parent (systemd) sees it, then end.
while True:
    _, st = os.waitpid(tid, WALL)
    if os.WIFEXITED(st) or os.WIFSIGNALED(st):
        print("exited" if os.WIFEXITED(st) else f"killed by signal {os.WTERMSIG(st)}", flush=True)
        os._exit(0)
"""

# Where a thread that waits for socket I/O sits: poll, select, pselect6, ppoll, epoll_wait, epoll_pwait.
IO_WAIT_SYSCALLS = {7, 23, 270, 271, 232, 281}


def task_state(pid: int, tid: int) -> str:
    return (Path(f"/proc/{pid}/task/{tid}/stat")).read_text().rsplit(")", 1)[1].split()[0]


def task_switches(pid: int, tid: int) -> int:
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches for task {tid} of {pid}")


def task_syscall(pid: int, tid: int) -> int | None:
    first = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()[0]
    return int(first) if first.lstrip("-").isdigit() else None


@contextmanager
def only_the_main_thread_stopped(pid: int) -> Iterator[None]:
    """Host process `pid` with its main thread (the daemon's loop) in a ptrace stop and every
    other thread running; the thread runs on when the block ends (or the process dies)."""
    tracer = subprocess.Popen([sys.executable, "-c", TRACER, str(pid), "120"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([tracer.stdout], [], [], 10)
        said = tracer.stdout.readline().decode().strip() if ready else "(nothing within 10 s)"
        if said != "stopped":
            tracer.kill()
            raise AssertionError(f"the tracer said {said!r}; its stderr: {tracer.communicate(timeout=10)[1].decode()}")
        yield
    finally:
        if tracer.poll() is None:
            tracer.stdin.close()  # ends the trace: a thread still stopped runs on
            try:
                tracer.wait(10)
            except subprocess.TimeoutExpired:
                tracer.kill()
                tracer.wait(10)


def daemon_threads(c: Container, unit: str) -> tuple[int, list[int]]:
    """(host pid, its other threads waiting for socket I/O) of `unit`: paho's network thread
    and the metrics exporter's, each in select()/poll() (the loop's thread waits on a
    condition, i.e. a futex; a worker thread may too)."""
    hpid = c.host_pid(main_pid(c, unit))
    others = [int(t.name) for t in Path(f"/proc/{hpid}/task").iterdir() if int(t.name) != hpid]

    return hpid, wait_for(lambda: [t for t in others if task_syscall(hpid, t) in IO_WAIT_SYSCALLS], 10,
                          interval=0.1, what=f"threads of {unit} waiting for socket I/O (paho's, the exporter's)")


STOPPED = ("t", "T")


def test_a_daemon_whose_loop_stops_feeding_the_watchdog_is_restarted(container):
    """Only the loop's thread stops (ptrace on the main thread); paho's network thread keeps
    running. The watchdog must still fire: WATCHDOG=1 provably comes from the loop, not from
    whichever thread happens to run (SIGSTOP would freeze them all and prove nothing of that)."""
    c = container
    unit = "iot-ingest"  # the loop (main thread), paho's network thread, the metrics exporter's
    pid = main_pid(c, unit)
    hpid, threads = daemon_threads(c, unit)

    # 1. Under the shipped watchdog (30 s), with time to look: the stop holds the loop's thread
    #    only. paho's thread is not stopped and keeps going round its loop: its select() times
    #    out at least every second and is entered again, which takes the GIL, so the stopped
    #    thread does not hold it. The loop's thread does not move at all. Released, it runs on.
    with only_the_main_thread_stopped(hpid):
        main_switches = task_switches(hpid, hpid)
        switches = {t: task_switches(hpid, t) for t in threads}
        assert task_state(hpid, hpid) in STOPPED
        for t in threads:
            wait_for(lambda: task_switches(hpid, t) >= switches[t] + 2 and task_syscall(hpid, t) in IO_WAIT_SYSCALLS,
                     10, interval=0.1, what=f"thread {t} (paho's, the exporter's) back in its I/O wait while the "
                                            "loop's thread is stopped")
            assert task_state(hpid, t) not in STOPPED
        assert task_state(hpid, hpid) in STOPPED and task_switches(hpid, hpid) == main_switches
    wait_for(lambda: task_state(hpid, hpid) not in STOPPED, 10, interval=0.05, what="the loop's thread running again")
    assert active(c, unit) and main_pid(c, unit) == pid

    # 2. A short watchdog for the test only: the same stop now outlasts it.
    shipped = c.sh(f"systemctl show -p WatchdogUSec --value {unit}").stdout.strip()
    dropin = f"/run/systemd/system/{unit}.service.d"
    c.sh(f"mkdir -p {dropin} && printf '[Service]\\nWatchdogSec=2\\n' > {dropin}/wd.conf && systemctl daemon-reload "
         f"&& systemctl restart {unit}")
    try:
        assert c.sh(f"systemctl show -p WatchdogUSec --value {unit}").stdout.strip() == "2s"
        pid = main_pid(c, unit)
        hpid, threads = daemon_threads(c, unit)
        cursor = journal_cursor(c)
        with only_the_main_thread_stopped(hpid):
            assert task_state(hpid, hpid) in STOPPED and all(task_state(hpid, t) not in STOPPED for t in threads)
            # no WATCHDOG=1 from the stopped loop: systemd aborts the daemon and starts it again
            wait_journal(c, unit, cursor, "watchdog timeout", timeout=30)
            wait_journal(c, unit, cursor, "failed with result 'watchdog'", timeout=30)
            wait_active(c, unit, 30, not_pid=pid)
            assert not Path(f"/proc/{hpid}").exists()
    finally:
        c.sh(f"rm -rf {dropin} && systemctl daemon-reload && systemctl restart {unit}")
    assert c.sh(f"systemctl show -p WatchdogUSec --value {unit}").stdout.strip() == shipped


def test_reload_applies_the_log_level_and_keeps_running_on_a_bad_file(container):
    """SIGHUP (`systemctl reload`): the daemon reads its config again; [log] level applies at
    once; a file that does not validate is refused and the old settings stay."""
    c = container
    unit, path = "iot-broker", "/etc/iot/iot.toml"
    original = c.sh(f"cat {path}").stdout
    pid = main_pid(c, unit)
    try:
        debug = with_log_level(original, "debug")
        assert tomllib.loads(debug)["log"]["level"] == "debug"
        c.sh(f"cat > {path}", input=debug)
        cursor = journal_cursor(c)
        c.sh(f"systemctl reload {unit}")
        wait_journal(c, unit, cursor, "reloaded", "log_level=debug")
        since = journal(c, unit, cursor)
        assert "reload failed" not in since and since.count("reloaded config=") == 1, since
        # The broker's own part: iot-local and the factory's roles (controller, dashboard, observer), the ACL.
        assert "access rules reloaded password_file=/etc/iot/passwd users=4 acl_file=/etc/iot/acl" in since
        assert active(c, unit) and main_pid(c, unit) == pid

        c.sh(f"cat > {path}", input=with_log_level(original, "loud"))
        cursor = journal_cursor(c)
        c.sh(f"systemctl reload {unit}")
        failed = wait_journal(c, unit, cursor, "reload failed")
        assert "reload failed" in journal(c, unit, cursor, priority="err"), failed  # logged as an error
        assert "reloaded" not in journal(c, unit, cursor).replace("Reloaded iot-broker", ""), failed
        assert active(c, unit) and main_pid(c, unit) == pid
    finally:
        c.sh(f"cat > {path}", input=original)
        cursor = journal_cursor(c)
        c.sh(f"systemctl reload {unit}")
    # the shipped file again, and a valid one: back to its level, still the same process
    level = tomllib.loads(original).get("log", {}).get("level", "info")
    wait_journal(c, unit, cursor, "reloaded", f"log_level={level}")
    assert active(c, unit) and main_pid(c, unit) == pid


def test_uninstall_removes_the_units_and_keeps_config_and_data(container):
    c = container
    c.sh("cd /root/iot-daemons && ./install.sh --uninstall")
    for u in UNITS:
        assert c.sh(f"test -e /etc/systemd/system/{u}.service", check=False).returncode != 0
        assert not active(c, u)
    assert c.sh("pgrep -u iot -a", check=False).stdout == ""  # nothing of ours still runs
    assert c.sh("test -d /opt/iot", check=False).returncode != 0
    c.sh("test -f /etc/iot/iot.toml && test -f '/var/lib/iot/transfer/field data.bin'")


def test_supervisor_install_runs_the_same_set(container):
    """Hosts without systemd: supervisord runs the set; iotctl status reads it; files still flow."""
    c = container
    out = c.sh("cd /root/iot-daemons && ./install.sh --wheelhouse /wheels --supervisor --start").stdout
    assert "started" in out
    try:
        wait_for(lambda: c.sh("/opt/iot/bin/iotctl status", check=False).returncode == 0, 60, interval=0.5,
                 what="every program RUNNING under supervisord")
        st = c.sh("/opt/iot/bin/iotctl status").stdout
        assert st.count("RUNNING") == len(UNITS), st
        c.sh("head -c 100000 /dev/urandom > /root/g.bin && cp /root/g.bin /var/lib/iot/outbox/.g && "
             "mv /var/lib/iot/outbox/.g /var/lib/iot/outbox/g.bin")
        wait_for(lambda: c.sh("cmp /root/g.bin /var/lib/iot/transfer/g.bin", check=False).returncode == 0, 60,
                 interval=0.5, what="file through the supervisord set")
    finally:
        c.sh("/opt/iot/bin/supervisorctl -c /etc/iot/supervisord.conf shutdown", check=False)
    wait_for(lambda: c.sh("pgrep -u iot", check=False).returncode == 1, 30, interval=0.2,
             what="supervisord and its programs gone after shutdown")
