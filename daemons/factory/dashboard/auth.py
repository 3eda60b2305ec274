"""Who may use the dashboard. It can stop machines, so:

* Without [factory] dashboard_password_file it listens on loopback only (start refused
  otherwise), and answers only requests whose Host is a loopback name or address: a web page
  elsewhere that makes its own name resolve to 127.0.0.1 (DNS rebinding) gets nothing.
* With one, every page and the WebSocket need a session: a random token handed out by the
  login form in a cookie (HttpOnly, SameSite=Strict), kept in memory (a restart asks for the
  password again), bounded in number and idle time.
* A WebSocket, and any POST, must come from a page of this origin (Origin = Host), so another
  site open in the same browser cannot drive it with the user's cookie.

Pure but for reading the password file; the server (server.py) applies these.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ...config import ConfigError

COOKIE = "iot_dashboard"
SESSION_IDLE = 12 * 3600.0  # seconds a session lives unused
SESSIONS = 32  # past it, the least recently used one goes


def is_loopback(host: str) -> bool:
    """Is this bind address or Host name loopback? Names other than "localhost" are not
    resolved: a name can be made to point anywhere."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_password(path: Path, source: Path | str | None) -> str:
    """The first line of the password file; a ConfigError (exit 78) if it cannot be read, is
    empty, or others may read or write it (like iot-ingest's keys file: a secret stays with
    its owner and group)."""
    key = "[factory] dashboard_password_file"
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(source, key, f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o007:
        raise ConfigError(source, key, f"{path} is open to others (mode {mode:04o}): chmod o-rwx {path}")
    password = text.splitlines()[0] if text else ""
    if not password:
        raise ConfigError(source, key, f"{path}: the first line (the password) is empty")
    return password


def password_ok(given: str, expected: str) -> bool:
    # Compared as digests: equal length, so the time taken says nothing about the password.
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest())


def host_name(host_header: str | None) -> str:
    """The name part of a Host header ("[::1]:8080" -> "::1")."""
    if not host_header:
        return ""
    return urlsplit("//" + host_header).hostname or ""


def same_origin(origin: str | None, host_header: str | None) -> bool:
    """Does the Origin header name the site this request was sent to? A missing Origin is
    refused: every browser sends one with a WebSocket and a POST."""
    if not origin or not host_header:
        return False
    o = urlsplit(origin)
    return o.scheme in ("http", "https") and o.netloc.lower() == host_header.lower()


@dataclass(slots=True)
class Session:
    peer: str
    last: float


class Sessions:
    """Logged-in browsers by token. `label(token)` names a session in logs without the token."""

    def __init__(self, idle: float = SESSION_IDLE, limit: int = SESSIONS, clock: Callable[[], float] = time.monotonic):
        self.idle, self.limit, self.clock = idle, limit, clock
        self._by_token: dict[str, Session] = {}  # least recently used first

    def __len__(self) -> int:
        return len(self._by_token)

    def create(self, peer: str) -> str:
        self._expire()
        while len(self._by_token) >= self.limit:
            del self._by_token[next(iter(self._by_token))]
        token = secrets.token_urlsafe(32)
        self._by_token[token] = Session(peer, self.clock())
        return token

    def check(self, token: str | None) -> bool:
        """True for a live session (and it counts as used now)."""
        if not token:
            return False
        s = self._by_token.pop(token, None)
        if s is None:
            return False
        now = self.clock()
        if now - s.last > self.idle:
            return False
        s.last = now
        self._by_token[token] = s  # to the most recently used end
        return True

    def drop(self, token: str | None) -> None:
        self._by_token.pop(token or "", None)

    def _expire(self) -> None:
        now = self.clock()
        for token in [t for t, s in self._by_token.items() if now - s.last > self.idle]:
            del self._by_token[token]

    @staticmethod
    def label(token: str | None) -> str:
        return "s-" + hashlib.sha256(token.encode()).hexdigest()[:8] if token else "-"
