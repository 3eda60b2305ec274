"""What every benchmark here shares: ports, /proc readings, the machine line, and writing one
section of docs/BENCHMARKS.md without touching the others."""

from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of /proc/PID/status in KiB: VmRSS now, or VmHWM (peak RSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def load_average() -> str:
    """The 1-minute load average, for the record: other work shares this machine."""
    return Path("/proc/loadavg").read_text().split()[0]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0  # already gone
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> str:
    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mosq = subprocess.run([shutil.which("mosquitto") or "mosquitto", "-h"], capture_output=True, text=True).stdout
    return (f"{os.cpu_count()} cores, {cpu}; Python {platform.python_version()}; "
            f"{mosq.splitlines()[0] if mosq else 'mosquitto ?'}; {time.strftime('%Y-%m-%d')}")


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace the `## heading` section of a markdown file (or append it), keeping the rest."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    # The whole heading line: "## Ingest" must not find "## Ingest on SQLite".
    found = re.search(rf"^## {re.escape(heading)}$", text, re.MULTILINE)
    start = found.start() if found else -1
    if start == -1:
        text = text.rstrip() + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section.rstrip() + "\n" + ("\n" + text[end + 1:] if end != -1 else "")
    path.write_text(text)
