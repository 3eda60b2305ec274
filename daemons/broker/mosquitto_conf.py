"""A Mosquitto 2 configuration read as Mosquitto 2.0 reads it (src/conf.c), into a model of the
broker it would run: its listeners and its settings, each with the line it came from.

Theory of operation. `read(FILE)` replays the file line by line, as Mosquitto does:
- A line whose first character is '#' is a comment; a blank line is skipped. The first word is
  the option; for a path or a string the value is the rest of the line, blanks trimmed (so a
  path may hold spaces and a trailing "# ..." is part of it); for a number or a boolean it is
  the next word (numbers as C's atoi reads them; booleans true/false/1/0 only).
- `include_dir DIR`, in the main file only (Mosquitto ignores it in an included file), reads
  every `*.conf` file in DIR there and then, in Mosquitto's order: case-insensitive, and the
  upper case of a letter before its lower case (00.conf 01.conf A.conf a.conf B.conf b.conf).
- Relative paths are relative to the folder Mosquitto runs in (`cwd`): Mosquitto opens them as
  given. Its systemd unit runs it in /; `mosquitto -c FILE` in the shell's folder. Every path
  in the model is absolute.
- Listener options (`protocol`, `certfile`, `max_connections`...) apply to the listener of the
  last `listener` line *of the same file*; before the first one of a file they apply to the
  implicit default listener, the one `port` and `bind_address` set. That listener exists if
  any of them set something on it; without `listener`, `port` and `bind_address` lines at all
  Mosquitto runs "local only" (and lets anonymous clients in, whatever allow_anonymous says).
- With `per_listener_settings true` the security options (password_file, acl_file,
  allow_anonymous, allow_zero_length_clientid) belong to the current listener, else they are
  global wherever they stand.
- `log_type` lines add up, each naming one type (its first word); what they come to is
  decided in convert.py, as Mosquitto does ("none" clears the types before it).

Every line ends up in exactly one place: a value of the model (`Setting`, which names its
line), or a `Report`, "not converted" (`problems`) or a note. What the model means for
iot-broker is decided by `convert.py`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class InputError(Exception):
    """The configuration (or a folder it includes) cannot be read: exit 66."""


@dataclass(frozen=True, slots=True)
class Line:
    file: str  # the path as Mosquitto names it in its messages
    number: int
    text: str  # the line, without its line end and trailing blanks

    @property
    def where(self) -> str:
        return f"{self.file}:{self.number}"

    @property
    def option(self) -> str:
        return self.text.split()[0]


@dataclass(frozen=True, slots=True)
class Report:
    line: Line | None
    why: str
    note: bool = False  # a note: nothing Mosquitto does is lost

    def __str__(self) -> str:
        kind = "note" if self.note else "not converted"
        if self.line is None:
            return f"{kind}: {self.why}"
        return f"{self.line.where}: {kind}: {_printable(self.line.text)}: {self.why}"


@dataclass(frozen=True, slots=True)
class Setting:
    value: Any
    line: Line


@dataclass(slots=True, eq=False)
class Listener:
    """One of Mosquitto's listeners. `opts` holds the keys of our ListenerConfig
    (protocol, certfile, keyfile, cafile, require_certificate, use_identity_as_username,
    tls_version) plus max_connections and, with per_listener_settings, the security keys."""

    line: Line | None  # the `listener` line; None for the implicit default listener
    port: Setting | None = None
    bind: Setting | None = None
    opts: dict[str, Setting] = field(default_factory=dict)
    lines: list[Line] = field(default_factory=list)  # every line that configures it
    # Options it has that we cannot carry over and whose loss would let in clients Mosquitto
    # refuses, or listen where Mosquitto does not: the listener is left out.
    blockers: list[Report] = field(default_factory=list)
    used: bool = False  # the implicit default listener: does Mosquitto open it?

    @property
    def label(self) -> str:
        """How a report names it: "the listener at FILE:LINE" or "Mosquitto's default listener
        (FILE:LINE)" after its port or bind_address line or its first option."""
        if self.line is not None:
            return f"the listener at {self.line.where}"
        anchor = self.anchor
        return "Mosquitto's default listener" + (f" ({anchor.where})" if anchor else "")

    @property
    def anchor(self) -> Line | None:
        """The line that stands for it in a report."""
        if self.line is not None:
            return self.line
        first = self.port or self.bind
        return first.line if first else self.lines[0] if self.lines else None

    @property
    def plain(self) -> bool:
        """Plain MQTT over TCP, what our default listener ([broker] host/port) is."""
        return "certfile" not in self.opts and self.opts.get("protocol", Setting("mqtt", None)).value == "mqtt"


# Bridge options converted, by Mosquitto's name (and its old aliases): our [[broker.bridge]] key.
BRIDGE_KEYS = {"address": "address", "addresses": "address", "topic": "topic", "remote_clientid": "remote_clientid",
               "clientid": "remote_clientid", "remote_username": "remote_username", "username": "remote_username",
               "remote_password": "remote_password", "password": "remote_password", "bridge_cafile": "bridge_cafile",
               "bridge_certfile": "bridge_certfile", "bridge_keyfile": "bridge_keyfile",
               "cleansession": "cleansession", "try_private": "try_private",
               "keepalive_interval": "keepalive_interval", "restart_timeout": "restart_timeout"}


@dataclass(slots=True, eq=False)
class Bridge:
    """One `connection` section: its name and the options after it, by our key names."""

    line: Line
    name: str
    opts: dict[str, Setting] = field(default_factory=dict)  # address and topic hold lists


@dataclass(slots=True)
class Model:
    main: Path
    files: list[str] = field(default_factory=list)  # every file read, in order, as absolute paths
    shown: list[str] = field(default_factory=list)  # the same as Mosquitto names them (Line.file)
    listeners: list[Listener] = field(default_factory=list)  # the `listener` lines, in order
    default: Listener = field(default_factory=lambda: Listener(None))
    settings: dict[str, Setting] = field(default_factory=dict)  # global options
    per_listener: Setting | None = None  # per_listener_settings true
    saw_listener: bool = False  # a `listener`, `port` or `bind_address` line: not local only
    log_types: list[Setting] = field(default_factory=list)  # each valid `log_type` line, in order
    bridges: list[Bridge] = field(default_factory=list)  # the `connection` sections, in order
    problems: list[Report] = field(default_factory=list)
    notes: list[Report] = field(default_factory=list)

    @property
    def local_only(self) -> bool:
        return not self.saw_listener

    def mosquitto_listeners(self) -> list[Listener]:
        """The listeners Mosquitto opens, in its order: the `listener` lines, then the default."""
        return self.listeners + ([self.default] if self.default.used else [])


# --- what each option is --------------------------------------------------------------------

_LOGGING = "iot-broker logs to stderr / the journal ([log] level sets how much)"
_BRIDGE = "a bridge option iot-broker's bridges do not have"
_PLUGIN = "plugins are not supported"
_MQTT5 = "an MQTT 5 setting not converted; [broker] max_keepalive and max_topic_alias are set by hand"
_MOSQ21 = "a Mosquitto 2.1 option; not supported"
_TLS_ENGINE = "TLS engines are not supported: keyfile must be a PEM file"

# Options we do not carry over, and why.
UNSUPPORTED: dict[str, str] = {
    **dict.fromkeys(("log_dest", "log_timestamp", "log_timestamp_format", "log_facility",
                     "connection_messages", "websockets_log_level"), _LOGGING),
    **dict.fromkeys(("auth_plugin", "plugin", "global_plugin", "auth_plugin_deny_special_chars"), _PLUGIN),
    **dict.fromkeys(("local_cleansession", "local_clientid", "local_password", "local_username",
                     "notifications_local_only", "notification_topic", "idle_timeout", "round_robin", "start_type",
                     "threshold"), _BRIDGE),
    "notifications": "iot-broker's bridges publish their state on the local broker only "
                     "($SYS/broker/connection/<remote_clientid>/state)",
    **dict.fromkeys(("max_keepalive", "max_topic_alias", "max_topic_alias_broker", "max_qos", "maximum_qos"),
                    _MQTT5),
    **dict.fromkeys(("accept_protocol_versions", "enable_control_api", "global_max_clients",
                     "global_max_connections", "disable_client_cert_date_checks", "retained_persistence"), _MOSQ21),
    **dict.fromkeys(("tls_engine", "tls_keyform", "tls_engine_kpass_sha1"), _TLS_ENGINE),
    "pid_file": "iot-broker writes no pid file: systemd knows its pid (Type=notify)",
    "user": "iot-broker does not switch users: its systemd unit runs it as the user iot",
    "psk_file": "TLS-PSK is not supported",
    "clientid_prefixes": "not supported (deprecated in Mosquitto): an acl_file pattern with %c ties topics to client ids",
    "auto_id_prefix": "iot-broker names a client that sends an empty client id itself",
    "max_inflight_bytes": "iot-broker bounds messages in flight by count only (max_inflight_messages)",
    "memory_limit": "not supported: iot-broker bounds each queue (max_queued_messages, max_queued_bytes) "
                    "and the retained store (max_retained_messages, max_retained_bytes)",
    "message_size_limit": "not supported: max_packet_size bounds whole packets",
    "queue_qos0_messages": "iot-broker queues only QoS 1 and 2 messages for a client that is away (as MQTT 3.1.1 says)",
    "retain_available": "iot-broker always supports retained messages",
    "upgrade_outgoing_qos": "not supported (it breaks MQTT's rule that a message is never delivered at a higher QoS)",
    "check_retain_source": "iot-broker checks a retained message against the reader's rights when it delivers it, "
                           "not again against its publisher's",
    "ciphers": "iot-broker uses OpenSSL's default cipher lists (through Python's ssl)",
    "ciphers_tls1.3": "iot-broker uses OpenSSL's default cipher lists (through Python's ssl)",
    "dhparamfile": "iot-broker offers ECDHE key exchange only (no DH parameters)",
    "http_dir": "iot-broker serves no HTTP files on a websockets listener",
    "websockets_headers_size": "not supported (iot-broker reads up to 64 KiB of HTTP request)",
    "websockets_origin": "not supported: iot-broker does not check the Origin of a WebSocket request",
    "socket_domain": "not supported: a listener without an address listens on IPv4 (0.0.0.0) only",
}

# Listener options whose loss would let in clients Mosquitto refuses, or listen wider: a
# listener that has one is left out, all its lines reported.
BLOCKERS: dict[str, str] = {
    "capath": "iot-broker takes the client CAs from cafile only",
    "crlfile": "certificate revocation lists are not supported",
    "psk_hint": "TLS-PSK is not supported",
    "use_subject_as_username": "only use_identity_as_username (the certificate's CN) is supported",
    "mount_point": "mount points are not supported",
    "bind_interface": "iot-broker binds addresses, not interfaces: give the `listener` line the interface's address",
    "use_username_as_clientid": "not supported",
}

# Options that need nothing: Mosquitto's effect is iot-broker's own behaviour, or none.
NOTES: dict[str, str] = {
    "autosave_interval": "not needed: iot-broker writes each message to its store as it takes it "
                         "(nothing is kept in memory only, to be saved later)",
    "autosave_on_changes": "not needed: iot-broker writes each message to its store as it takes it",
    "persistence_file": "iot-broker's store is store.db (SQLite) in persistence_location; mosquitto.db is not read",
    "retry_interval": "Mosquitto 2 ignores it too",
    "allow_duplicate_messages": "iot-broker delivers a message once to a client, however many of its "
                                "subscriptions match",
    "set_tcp_nodelay": "iot-broker's connections always have TCP_NODELAY set",
}

# Mosquitto 2.0's log_type names (conf.c; "websockets" where built with them, as Debian's is).
LOG_TYPES = ("none", "information", "notice", "warning", "error", "debug", "subscribe", "unsubscribe", "websockets",
             "all")
_LISTENER_STRINGS = ("certfile", "keyfile", "cafile", "tls_version")
_LISTENER_BOOLS = ("require_certificate", "use_identity_as_username")
_SECURITY = ("password_file", "acl_file", "allow_anonymous", "allow_zero_length_clientid")
_GLOBAL_INTS = ("max_inflight_messages", "max_queued_messages", "max_queued_bytes", "max_packet_size", "sys_interval")
_PATHS = ("certfile", "keyfile", "cafile", "password_file", "acl_file", "persistence_location")
# Listener options that make Mosquitto open its implicit default listener when set on it.
_OPENS_DEFAULT = {"certfile", "keyfile", "cafile", "tls_version", *BLOCKERS, "max_qos", "maximum_qos", "socket_domain",
                  "ciphers", "ciphers_tls1.3", "dhparamfile", "tls_engine", "tls_keyform", "tls_engine_kpass_sha1"}


def _opens_default(option: str, setting: Setting | None) -> bool:
    """Does this option, set on Mosquitto's default listener, make Mosquitto open it (the test
    at the end of config__parse_args)? A value equal to the default does not."""
    if option in _OPENS_DEFAULT:
        return True
    value = setting.value if setting is not None else None
    return ((option == "protocol" and value not in (None, "mqtt"))
            or (option in ("require_certificate", "use_identity_as_username") and value is True)
            or (option == "max_connections" and value is not None and value >= 0))
_LISTENER_SCOPED = {*_LISTENER_STRINGS, *_LISTENER_BOOLS, "protocol", "max_connections", *BLOCKERS,
                    "max_qos", "maximum_qos", "max_topic_alias", "max_topic_alias_broker", "socket_domain",
                    "ciphers", "ciphers_tls1.3", "dhparamfile", "tls_engine", "tls_keyform", "tls_engine_kpass_sha1",
                    "http_dir", "websockets_origin"}


def atoi(text: str) -> int:
    """C's atoi: leading blanks, a sign, digits; anything else ends it (no digits: 0)."""
    m = re.match(r"[ \t]*([+-]?[0-9]+)", text)
    return int(m.group(1)) if m else 0


def mosquitto_order(name: str) -> list[tuple[int, int]]:
    """Sort key of Mosquitto's include_dir order (scmp_p in conf.c): letter by letter, by the
    upper-cased letter, then upper case before lower case."""
    return [(ord(c.upper()) if c.isascii() else ord(c), ord(c)) for c in name]


def _printable(text: str) -> str:
    """`text` fit for a TOML comment and a terminal: control characters shown as '?'."""
    return "".join("?" if (ord(c) < 32 and c != "\t") or ord(c) == 127 else c for c in text)


class _Reader:
    def __init__(self, main: Path, cwd: Path):
        self.cwd = cwd
        self.m = Model(main=main)
        self.cur = self.m.default
        self.security_seen = False

    def path(self, value: str) -> Path:
        p = Path(value)
        return Path(os.path.normpath(p if p.is_absolute() else self.cwd / p))

    # reporting ----------------------------------------------------------------------------

    def problem(self, line: Line, why: str) -> None:
        self.m.problems.append(Report(line, why))

    def note(self, line: Line | None, why: str) -> None:
        self.m.notes.append(Report(line, why, note=True))

    # files ---------------------------------------------------------------------------------

    def file(self, shown: str, where: Path, level: int) -> None:
        if where.is_dir():
            raise InputError(f"{shown}: is a folder, not a configuration file")
        try:
            data = where.read_bytes()
        except OSError as e:
            raise InputError(f"{shown}: cannot read: {e.strerror or e}") from None
        self.m.files.append(str(where))
        self.m.shown.append(shown)
        # As in Mosquitto, listener options before a file's first `listener` line are the
        # default listener's, whatever the previous file's last `listener` line was.
        self.cur = self.m.default
        for number, raw in enumerate(data.decode("utf-8", errors="replace").split("\n"), 1):
            raw = raw.rstrip("\r")
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue  # Mosquitto refuses "  # x" (option "#"); we read it as the comment it is
            line = Line(shown, number, raw.rstrip())
            words = line.text.split(None, 1)
            self.option(line, words[0], words[1].strip() if len(words) > 1 else "", level)

    def include_dir(self, line: Line, value: str, level: int) -> None:
        if level > 0:
            self.note(line, "Mosquitto reads include_dir in the main file only: this one is ignored")
            return
        if not value:
            self.problem(line, "no value: Mosquitto refuses the file")
            return
        folder = self.path(value)
        try:
            names = [e.name for e in os.scandir(folder) if len(e.name) > 5 and e.name.endswith(".conf")]
        except OSError as e:
            raise InputError(f"{line.where}: include_dir {value}: cannot read the folder: {e.strerror or e}") from None
        saved = self.cur
        for name in sorted(names, key=mosquitto_order):
            self.file(f"{value.rstrip('/')}/{name}", folder / name, level + 1)
        self.cur = saved

    # options -------------------------------------------------------------------------------

    def option(self, line: Line, option: str, value: str, level: int) -> None:
        m, cur = self.m, self.cur
        if option == "include_dir":
            self.include_dir(line, value, level)
        elif option == "listener":
            self.listener(line, value)
        elif option == "port":
            port = atoi(value)
            if not 1 <= port <= 65535:
                self.problem(line, "not a port (1-65535): Mosquitto refuses the file")
                return
            m.saw_listener = True
            m.default.port, m.default.used = Setting(port, line), True
            m.default.lines.append(line)
        elif option == "bind_address":
            m.saw_listener = True
            if self.once(m.default.bind, line, "bind_address"):
                m.default.bind, m.default.used = Setting(value, line), True
                m.default.lines.append(line)
        elif option == "per_listener_settings":
            self.per_listener_settings(line, value)
        elif option in _SECURITY:
            target = cur.opts if m.per_listener else m.settings
            if option in ("password_file", "acl_file"):
                if self.once(target.get(option), line, option):
                    target[option] = Setting(self.path(value), line)
            else:
                flag = self.boolean(line, value)
                if flag is not None:
                    target[option] = Setting(flag, line)
            if m.per_listener:
                zero = target.get("allow_zero_length_clientid") if option == "allow_zero_length_clientid" else None
                self.on_listener(line, option, opens=option == "password_file" or (
                    zero is not None and zero.value is False))
            self.security_seen = True
        elif option in _LISTENER_SCOPED or option.startswith(("auth_opt_", "plugin_opt_")):
            self.listener_option(line, option, value)
        elif option in _GLOBAL_INTS:
            if not value:
                self.problem(line, "no value: Mosquitto refuses the file")
            else:
                m.settings[option] = Setting(atoi(value), line)
        elif option == "persistence":
            flag = self.boolean(line, value)
            if flag is not None:
                m.settings[option] = Setting(flag, line)
        elif option == "persistence_location":
            if self.once(m.settings.get(option), line, option):
                m.settings[option] = Setting(self.path(value), line)
        elif option == "persistent_client_expiration":
            self.expiration(line, value)
        elif option == "log_type":
            word = value.split()[0] if value.split() else ""
            if not word:
                self.problem(line, "no value: Mosquitto refuses the file")
            elif word not in LOG_TYPES:
                self.problem(line, f"not a log_type ({', '.join(LOG_TYPES)}): Mosquitto refuses the file")
            else:
                m.log_types.append(Setting(word, line))
        elif option in NOTES:
            self.note(line, NOTES[option])
        elif option == "connection" or option in BRIDGE_KEYS:
            self.bridge_option(line, option, value)
        elif option in UNSUPPORTED or option.startswith("bridge_"):
            if option in ("auth_plugin", "plugin", "auto_id_prefix", "psk_file", "check_retain_source"):
                self.security_seen = True
            self.problem(line, UNSUPPORTED.get(option, _BRIDGE))
        else:
            self.problem(line, "not a Mosquitto 2.0 option (Mosquitto refuses the file)")

    def bridge_option(self, line: Line, option: str, value: str) -> None:
        """`connection NAME` opens a bridge; the options after it are that bridge's."""
        m = self.m
        if option == "connection":
            if not value:
                self.problem(line, "no value: Mosquitto refuses the file")
                return
            m.bridges.append(Bridge(line, value.split()[0]))
            return
        if not m.bridges:
            self.problem(line, "a bridge option before any `connection` line: Mosquitto refuses the file")
            return
        b, key = m.bridges[-1], BRIDGE_KEYS[option]
        if not value:
            self.problem(line, "no value: Mosquitto refuses the file")
        elif key == "address":
            hosts = [w if ":" in w else f"{w}:1883" for w in value.split()]  # Mosquitto's default port
            b.opts[key] = Setting(hosts, line)
        elif key == "topic":
            old = b.opts.get(key)
            b.opts[key] = Setting((old.value if old else []) + [value], line)
        elif key in ("cleansession", "try_private"):
            flag = self.boolean(line, value)
            if flag is not None:
                b.opts[key] = Setting(flag, line)
        elif key == "keepalive_interval":
            b.opts[key] = Setting(atoi(value), line)
        elif key == "restart_timeout":
            words = value.split()
            if len(words) > 1:
                self.note(line, f"iot-broker waits a constant restart_timeout: {atoi(words[0])} s (the base), "
                                "with no backoff up to the cap")
            b.opts[key] = Setting(atoi(words[0]), line)
        elif key.startswith("bridge_"):
            b.opts[key] = Setting(self.path(value), line)
        else:
            b.opts[key] = Setting(value, line)

    def per_listener_settings(self, line: Line, value: str) -> None:
        flag = self.boolean(line, value)
        if flag is None:
            return
        if self.m.per_listener is not None:
            self.note(line, "Mosquitto ignores it: per_listener_settings true cannot be undone")
        elif flag and self.security_seen:
            self.problem(line, "Mosquitto refuses the file: per_listener_settings must come before any "
                               "security setting")
        elif flag:
            self.m.per_listener = Setting(True, line)
            self.problem(line, "iot-broker keeps one set of rules for all listeners (a listener may override "
                               "allow_anonymous); the listeners' files are converted where they agree")
        # false is Mosquitto's default and ours: nothing to carry over

    def listener(self, line: Line, value: str) -> None:
        words = value.split()
        port = atoi(words[0]) if words else -1
        bind = words[1] if len(words) > 1 and not words[1].startswith("#") else None
        lst = Listener(line, lines=[line])
        self.m.saw_listener = True
        self.m.listeners.append(lst)
        self.cur = lst
        if port == 0 and bind:
            lst.blockers.append(Report(line, "unix sockets are not supported"))
        elif not 1 <= port <= 65535:
            lst.blockers.append(Report(line, "not a port (1-65535): Mosquitto refuses the file"))
        else:
            lst.port = Setting(port, line)
            if bind:
                lst.bind = Setting(bind, line)

    def listener_option(self, line: Line, option: str, value: str) -> None:
        lst = self.cur
        if option.startswith(("auth_opt_", "plugin_opt_")):
            self.problem(line, _PLUGIN)
            return
        if option in BLOCKERS:
            lst.blockers.append(Report(line, BLOCKERS[option]))
        elif option == "protocol":
            if value in ("mqtt", "websockets"):
                lst.opts[option] = Setting(value, line)
            else:
                lst.blockers.append(Report(line, f"protocol {value!r}: iot-broker speaks mqtt and websockets"))
        elif option in _LISTENER_STRINGS:
            if self.once(lst.opts.get(option), line, option):
                lst.opts[option] = Setting(self.path(value) if option in _PATHS else value, line)
        elif option in _LISTENER_BOOLS:
            flag = self.boolean(line, value)
            if flag is None:
                return
            lst.opts[option] = Setting(flag, line)
        elif option == "max_connections":
            if not value:
                self.problem(line, "no value: Mosquitto ignores it")
                return
            lst.opts[option] = Setting(atoi(value), line)
        else:
            self.problem(line, UNSUPPORTED[option])
        self.on_listener(line, option, opens=_opens_default(option, lst.opts.get(option)))

    def on_listener(self, line: Line, option: str, opens: bool) -> None:
        """`line` configured the current listener; on the default listener, `opens` says
        whether it makes Mosquitto open it."""
        self.cur.lines.append(line)
        if self.cur is self.m.default and opens:
            self.m.default.used = True

    def expiration(self, line: Line, value: str) -> None:
        word = value.split()[0] if value.split() else ""
        units = {"h": 3600, "d": 86400, "w": 7 * 86400, "m": 30 * 86400, "y": 365 * 86400}
        if not word or word[-1] not in units or atoi(word[:-1]) * units[word[-1]] <= 0:
            self.problem(line, "not a duration such as 14d (h, d, w, m or y): Mosquitto refuses the file")
            return
        self.m.settings["persistent_client_expiration"] = Setting(f"{atoi(word[:-1])}{word[-1]}", line)

    # values --------------------------------------------------------------------------------

    def once(self, previous: Setting | None, line: Line, option: str) -> bool:
        """A string option may be set once (per listener): Mosquitto refuses a second one."""
        if previous is not None:
            self.problem(line, f"a second {option} (the first is at {previous.line.where}): Mosquitto refuses the file")
            return False
        if not line.text.split(None, 1)[1:]:
            self.problem(line, "no value: Mosquitto refuses the file")
            return False
        return True

    def boolean(self, line: Line, value: str) -> bool | None:
        word = value.split()[0] if value.split() else ""
        if word in ("true", "1"):
            return True
        if word in ("false", "0"):
            return False
        self.problem(line, "not true, false, 1 or 0: Mosquitto refuses the file")
        return None


def read(path: str | os.PathLike, cwd: str | os.PathLike | None = None) -> Model:
    """The broker a Mosquitto configuration describes. `cwd`: the folder Mosquitto runs in,
    which relative paths are relative to (default: the current folder). Raises InputError."""
    base = Path(os.path.abspath(cwd if cwd is not None else os.getcwd()))
    # The file named is the one meant, wherever Mosquitto would run: relative to here.
    r = _Reader(Path(os.path.abspath(path)), base)
    r.file(str(path), r.m.main, 0)
    return r.m
