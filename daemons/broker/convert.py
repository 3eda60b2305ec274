"""`iotctl broker-config --from-mosquitto FILE`: a Mosquitto 2 configuration as iot-broker's
[broker] section and [[broker.listener]] tables.

Theory of operation. mosquitto_conf.read() replays the file (and its include_dir files) into a
model of the broker Mosquitto would run; `_Mapper` decides what that broker is in our keys;
`Conversion.text` is the TOML. The rule is that the converted broker accepts and refuses the
clients Mosquitto would, so:
- Our default listener ([broker] host/port) is plain MQTT and always there. It takes Mosquitto's
  default listener (`port`/`bind_address`) if plain, else the first plain `listener`; the
  other listeners become tables. With no plain listener at all it is bound to 127.0.0.1.
- Without `listener`, `port` and `bind_address` Mosquitto runs local only and lets anonymous
  clients in: host = "127.0.0.1" and allow_anonymous = true.
- A listener with an option whose loss would let more clients in or listen wider (capath,
  crlfile, mount_point, bind_interface, ...; a certificate file missing here) is left out
  whole, every line of it reported, rather than converted into a more open one.
- With per_listener_settings true each listener's allow_anonymous is carried to its table;
  password_file, acl_file and allow_zero_length_clientid are converted where the listeners
  agree, and the listeners that differ are reported (we keep one of each for all).
- Our broker lets every client in where no password_file is set and allow_anonymous is false,
  on 127.0.0.1 only; Mosquitto refuses them all. Tables then get allow_anonymous = false
  (which refuses everyone there too); the default listener cannot, and is reported.
- `log_type` lines add up as in Mosquitto (each adds its type, "none" clears those before it,
  "all" is every type) into one `log_type` list of the same names.
- A value is emitted only when the file sets it (Mosquitto's defaults that differ from ours,
  max_queued_messages 1000 or persistence false, are not imposed), in our units.
The TOML is loaded back with `tomllib` and `daemons.config.parse` before anyone sees it.

Exit codes: 0 all converted; 1 something not converted (the output is still written); 64 bad
usage; 66 the configuration (or an include_dir folder) cannot be read; 73 OUT exists (without
--force) or cannot be written.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config as configmod
from ..durable import atomic_write
from ..service import EX_USAGE, Log
from .mosquitto_conf import InputError, Line, Listener, Model, Report, Setting, read

EX_NOT_CONVERTED = 1
EX_NOINPUT = 66
EX_CANTCREAT = 73

_MAX_INFLIGHT = 65535
_MAX_QUEUED = 10_000_000
_MAX_CONNECTIONS = 1_000_000
_MIN_BODY, _MAX_BODY = 64, 268_435_455
_LEFT_OUT = ("{label} is left out: without this it would let in clients Mosquitto refuses or listen where "
             "Mosquitto does not")


@dataclass(frozen=True, slots=True)
class Key:
    name: str
    value: Any
    line: Line | None  # the Mosquitto line it comes from
    why: str = ""  # a comment above the key


@dataclass(frozen=True, slots=True)
class Conversion:
    source: Path
    files: tuple[str, ...]
    broker: tuple[Key, ...]
    listeners: tuple[tuple[Key, ...], ...]
    problems: tuple[Report, ...]
    notes: tuple[Report, ...]
    text: str  # the TOML, checked by daemons.config.parse


def body_limit(packet: int) -> int:
    """Mosquitto's max_packet_size counts the whole packet; ours (max_packet_size too) the
    remaining length only: the largest remaining length whose packet (1 byte of type, 1-4 of
    length) is at most `packet` bytes."""
    body = packet - 2
    while body > 0 and 1 + _varint_len(body) + body > packet:
        body -= 1
    return body


def _varint_len(n: int) -> int:
    return 1 if n < 128 else 2 if n < 16384 else 3 if n < 2_097_152 else 4


class _Mapper:
    def __init__(self, m: Model):
        self.m = m
        self.broker: dict[str, Key] = {}
        self.problems = list(m.problems)
        self.notes = list(m.notes)

    def problem(self, line: Line | None, why: str) -> None:
        self.problems.append(Report(line, why))

    def note(self, line: Line | None, why: str) -> None:
        self.notes.append(Report(line, why, note=True))

    def put(self, name: str, value: Any, line: Line | None, why: str = "", into: dict | None = None) -> None:
        value = str(value) if isinstance(value, Path) else value  # a Key holds what TOML holds
        (self.broker if into is None else into)[name] = Key(name, value, line, why)

    # the whole ---------------------------------------------------------------------------

    def run(self) -> tuple[dict[str, Key], list[dict[str, Key]]]:
        m = self.m
        if not m.default.used:
            blocked = {r.line: r.why for r in m.default.blockers}
            for line in m.default.lines:
                if line in blocked:
                    self.problem(line, blocked[line])
                else:
                    self.note(line, "Mosquitto ignores it: it sets the default listener (it stands before the "
                                    "file's first `listener` line), which Mosquitto does not open here")
        listeners = [lst for lst in m.mosquitto_listeners() if self.usable(lst)]
        default = next((lst for lst in ([m.default] if m.default in listeners else []) + listeners if lst.plain),
                       None)
        self.values()
        tables = [self.table(lst) for lst in listeners if lst is not default]
        self.default_listener(default, tables)
        self.security(listeners, default, tables)
        self.max_connections(listeners)
        self.bridge_tables = [t for t in (self.bridge(b) for b in m.bridges) if t is not None]
        return self.broker, [t for _, t in tables]

    def bridge(self, b) -> dict[str, Key] | None:
        """A `connection` section as a [[broker.bridge]] table, checked as iot-broker checks it
        (a topic line it would refuse is reported with the reason); None if it cannot be one."""
        t: dict[str, Key] = {}
        self.put("name", b.name, b.line, into=t)
        for key, setting in b.opts.items():
            self.put(key, setting.value, setting.line, into=t)
        for key in ("address", "topic"):
            if key not in t:
                self.problem(b.line, f"the bridge has no {key}: Mosquitto refuses the file; left out")
                return None
        try:
            configmod.parse({"broker": {"bridge": [{k: v.value for k, v in t.items()}]}}, None)
        except configmod.ConfigError as e:
            key = e.key.split()[-1]
            self.problem(t[key].line if key in t else b.line, f"{e.problem}; the bridge is left out")
            return None
        return t

    # listeners -----------------------------------------------------------------------------

    def usable(self, lst: Listener) -> bool:
        """Check a listener's TLS settings as Mosquitto and our config do; False (and every
        line of it reported) if it has to be left out."""
        o, block = lst.opts, lst.blockers
        if ("certfile" in o) != ("keyfile" in o):
            have = o.get("certfile") or o.get("keyfile")
            block.append(Report(have.line, "TLS needs both certfile and keyfile: Mosquitto refuses one alone"))
        tls = "certfile" in o and "keyfile" in o
        if not tls:
            for key in ("cafile", "require_certificate", "use_identity_as_username", "tls_version"):
                if key in o and o[key].value is not False:
                    self.problem(o.pop(key).line, "a TLS setting on a listener without certfile and keyfile: "
                                                  "it has no effect there")
        if o.get("use_identity_as_username", Setting(False, None)).value and not o.get(
                "require_certificate", Setting(False, None)).value and "cafile" in o:
            # Mosquitto refuses a client without a certificate there at CONNECT; we at the handshake.
            o["require_certificate"] = Setting(True, o["use_identity_as_username"].line)
            self.note(o["use_identity_as_username"].line, "converted with require_certificate = true: Mosquitto "
                                                          "refuses clients without a certificate here too")
        if o.get("require_certificate", Setting(False, None)).value and "cafile" not in o:
            block.append(Report(o["require_certificate"].line, "require_certificate needs cafile (capath is not "
                                                               "supported)"))
        if "tls_version" in o and o["tls_version"].value not in ("tlsv1.2", "tlsv1.3"):
            s = o.pop("tls_version")
            if s.value == "tlsv1.1":
                self.problem(s.line, "iot-broker accepts TLS 1.2 at the lowest: clients limited to TLS 1.1 are "
                                     "refused")
            else:
                block.append(Report(s.line, "not tlsv1.3, tlsv1.2 or tlsv1.1: Mosquitto refuses it"))
        for key in ("certfile", "keyfile", "cafile"):
            if key in o and not Path(o[key].value).is_file():
                block.append(Report(o[key].line, f"no such file here: {o[key].value} (iot-broker checks a "
                                                 "listener's files at start: convert on the machine that has them)"))
        if not block:
            return True
        reported = set()
        for r in block:
            self.problem(r.line, f"{r.why}; " + _LEFT_OUT.format(label=lst.label))
            reported.add(r.line)
        for line in lst.lines:
            if line not in reported:
                self.problem(line, f"part of {lst.label}, which is left out ({block[0].line.where})")
        return False

    def table(self, lst: Listener) -> tuple[Listener, dict[str, Key]]:
        t: dict[str, Key] = {}
        if lst.port:
            self.put("port", lst.port.value, lst.port.line, into=t)
        else:
            self.put("port", 1883, None, "Mosquitto's default listener: no `port` line, so 1883", into=t)
        if lst.bind:
            self.put("bind_address", lst.bind.value, lst.bind.line, into=t)
        for key in ("protocol", "certfile", "keyfile", "cafile", "require_certificate", "use_identity_as_username",
                    "tls_version"):
            if key in lst.opts:
                self.put(key, lst.opts[key].value, lst.opts[key].line, into=t)
        return lst, t

    def default_listener(self, default: Listener | None, tables: list[tuple[Listener, dict[str, Key]]]) -> None:
        m = self.m
        if m.local_only and (default is m.default or any(lst is m.default for lst, _ in tables)):
            self.note(None, "listener options but no `listener` or `port` line: Mosquitto opens its default "
                            "listener on 1883 of every interface and lets anonymous clients in; converted as "
                            "such (add a `listener` line to choose)")
        if default is not None:
            if default.port:
                self.put("port", default.port.value, default.port.line)
            if default.bind:
                self.put("host", default.bind.value, default.bind.line)
        elif m.local_only and not m.default.used:
            self.put("host", "127.0.0.1", None, "Mosquitto without `listener` and `port` lines runs local only: "
                                                "port 1883 of this machine")
            self.note(None, "no `listener` and no `port` line: Mosquitto runs local only (127.0.0.1:1883, "
                            "anonymous clients let in); converted as such")
        else:  # no plain listener to take: ours, which is always there, on loopback
            taken = {t["port"].value for _, t in tables}
            port = next(p for p in range(1883, 65536) if p not in taken)
            why = ("iot-broker always has a plain MQTT listener here; the Mosquitto file has none: this one "
                   "listens on this machine only")
            self.put("host", "127.0.0.1", None, why)
            if port != 1883:
                self.put("port", port, None, why)
            self.note(None, f"iot-broker always has a plain MQTT listener ([broker] host/port) and the Mosquitto "
                            f"file has none: it is set to 127.0.0.1:{port}, this machine only")

    # security ------------------------------------------------------------------------------

    def security(self, listeners: list[Listener], default: Listener | None,
                 tables: list[tuple[Listener, dict[str, Key]]]) -> None:
        m, per = self.m, self.m.per_listener is not None
        if per and listeners:
            password = self.one_for_all("password_file", None, listeners, default)
            acl = self.one_for_all("acl_file", None, listeners, default)
            zero = self.one_for_all("allow_zero_length_clientid", True, listeners, default)
        elif per:  # local only: Mosquitto's own listeners have no per-listener settings
            password = acl = zero = None
        else:
            password, acl = m.settings.get("password_file"), m.settings.get("acl_file")
            zero = m.settings.get("allow_zero_length_clientid")
        for key, s in (("password_file", password), ("acl_file", acl), ("allow_zero_length_clientid", zero)):
            if s is not None:
                self.put(key, s.value, s.line)
                if key != "allow_zero_length_clientid" and not Path(s.value).is_file():
                    self.note(s.line, f"{s.value} does not exist here: iot-broker reads it at start (and on SIGHUP)")

        def anonymous(lst: Listener | None) -> Setting:
            """Mosquitto's allow_anonymous for a listener (None: the one we add), and its line."""
            if m.local_only:
                return Setting(True, None)
            s = (lst.opts if per and lst is not None else m.settings).get("allow_anonymous")
            return s if s is not None else Setting(False, None)

        mine = anonymous(default)
        if m.local_only:
            self.put("allow_anonymous", True, None, "Mosquitto lets anonymous clients in when it runs without "
                                                    "`listener` and `port` lines")
            said = m.default.opts.get("allow_anonymous") or m.settings.get("allow_anonymous")
            if said is not None and said.value is False:
                self.note(said.line, "Mosquitto ignores it without `listener` and `port` lines: anonymous clients "
                                     "are let in")
        elif mine.line is not None:
            self.put("allow_anonymous", mine.value, mine.line)
        ours = mine.value or password is None  # what our broker does without a listener's own setting
        for lst, t in tables:
            theirs = anonymous(lst)
            if theirs.value != ours or (per and "allow_anonymous" in lst.opts):
                why = "" if per and "allow_anonymous" in lst.opts else (
                    "Mosquitto refuses every client here (no password_file, allow_anonymous false)"
                    if password is None and not theirs.value else "")
                self.put("allow_anonymous", theirs.value, theirs.line or lst.line, why, into=t)
        if default is not None and not m.local_only and password is None and not mine.value:
            self.problem(default.anchor,
                         "with no password_file and allow_anonymous false Mosquitto refuses every client on this "
                         "listener; iot-broker cannot: it listens on 127.0.0.1 only and lets local clients in "
                         "(set a password_file or allow_anonymous)")

    def one_for_all(self, key: str, absent: Any, everyone: list[Listener], default: Listener | None) -> Setting | None:
        """per_listener_settings true: the listeners' `key` as one value for all (the default
        listener's, or the first one's); every listener that differs is reported."""
        chosen = default if default in everyone else everyone[0]
        s = chosen.opts.get(key)
        value = s.value if s is not None else absent
        for lst in everyone:
            mine = lst.opts.get(key)
            if (mine.value if mine is not None else absent) != value:
                line = mine.line if mine is not None else lst.anchor
                self.problem(line, f"per_listener_settings true: {lst.label} has {key} "
                                   f"{_shown(mine.value if mine else absent)}, {chosen.label} {_shown(value)}; "
                                   f"iot-broker keeps one {key} for all listeners: {_shown(value)}")
        return s

    def max_connections(self, listeners: list[Listener]) -> None:
        chosen: Setting | None = None
        for lst in listeners:
            s = lst.opts.get("max_connections")
            if s is None:
                continue
            if s.value <= 0:
                self.note(s.line, f"no limit in Mosquitto; iot-broker keeps a max_connections (100000 unless "
                                  f"set, up to {_MAX_CONNECTIONS}, and no more than the file descriptor limit allows)")
            elif chosen is None:
                chosen = s
                value = min(s.value, _MAX_CONNECTIONS)
                self.put("max_connections", value, s.line)
                if value != s.value:
                    self.problem(s.line, f"iot-broker takes at most {_MAX_CONNECTIONS}: converted as "
                                         f"max_connections = {value}")
                if len(listeners) > 1:
                    self.note(s.line, "per listener in Mosquitto; iot-broker's max_connections counts the "
                                      "connections of all listeners together")
            elif s.value != chosen.value:
                self.problem(s.line, f"max_connections is per listener in Mosquitto and one for the whole broker in "
                                     f"iot-broker: {chosen.value} (from {chosen.line.where}) applies")

    # global values -------------------------------------------------------------------------

    def values(self) -> None:
        st = self.m.settings
        if s := st.get("max_inflight_messages"):
            if s.value <= 0 or s.value == _MAX_INFLIGHT:
                self.put("max_inflight_messages", _MAX_INFLIGHT, s.line, "no limit in Mosquitto; 65535 is the "
                                                                         "largest iot-broker takes")
            elif s.value > _MAX_INFLIGHT:
                self.problem(s.line, "more than 65535: Mosquitto refuses the file")
            else:
                self.put("max_inflight_messages", s.value, s.line)
        if s := st.get("max_queued_messages"):
            value = max(s.value, 0) or _MAX_QUEUED
            if s.value <= 0:
                self.put("max_queued_messages", value, s.line, f"no limit in Mosquitto; {_MAX_QUEUED} is the largest "
                                                               "iot-broker takes")
            else:
                self.put("max_queued_messages", min(value, _MAX_QUEUED), s.line)
                if value > _MAX_QUEUED:
                    self.problem(s.line, f"iot-broker takes at most {_MAX_QUEUED}: converted as "
                                         f"max_queued_messages = {_MAX_QUEUED}")
        if s := st.get("max_queued_bytes"):
            self.put("max_queued_bytes", max(s.value, 0), s.line, "" if s.value > 0 else "0: no limit by bytes, "
                                                                                         "in both")
        if s := st.get("max_packet_size"):
            if s.value < 20:
                self.problem(s.line, "less than 20: Mosquitto refuses the file")
            else:
                body = min(body_limit(s.value), _MAX_BODY)
                why = f"Mosquitto counts the whole packet, iot-broker its body: {s.value} bytes of packet"
                if body < _MIN_BODY:
                    self.problem(s.line, f"iot-broker takes packets of {_MIN_BODY} bytes of body at the least: "
                                         f"converted as max_packet_size = {_MIN_BODY}")
                self.put("max_packet_size", max(body, _MIN_BODY), s.line, why)
        if s := st.get("sys_interval"):
            if 0 <= s.value <= 65535:
                self.put("sys_interval", float(s.value), s.line)
            else:
                self.problem(s.line, "not from 0 to 65535: Mosquitto refuses the file")
        if s := st.get("persistence"):
            self.put("persistence", s.value, s.line)
        if s := st.get("persistence_location"):
            self.put("persistence_location", s.value, s.line,
                     "iot-broker keeps its own SQLite store (store.db) in this folder, not Mosquitto's mosquitto.db "
                     "(which it does not read); the folder must be writable by the user iot-broker runs as")
        if s := st.get("persistent_client_expiration"):
            self.put("persistent_client_expiration", s.value, s.line)
        self.log_type()
        if (s := st.get("persistence")) and s.value and "persistence_location" not in st:
            self.note(s.line, "Mosquitto keeps mosquitto.db in the folder it runs in; iot-broker keeps store.db in "
                              "<state_dir>/broker")

    def log_type(self) -> None:
        """The log_type lines added up as Mosquitto does: each adds its type, "none" clears those
        before it, "all" is every type (and absorbs the ones after it)."""
        lines = self.m.log_types
        if not lines:
            return
        names: list[str] = []
        for s in lines:
            if s.value == "none":
                names = []
            elif s.value == "all":
                names = ["all"]
            elif "all" not in names and s.value not in names:
                names.append(s.value)
        why = ("log_type lines added up, as Mosquitto does: " + ", ".join(s.line.where for s in lines)
               if len(lines) > 1 else "")
        self.put("log_type", names or ["none"], lines[0].line, why)
        if "notice" in names and "debug" not in names:
            self.note(next(s.line for s in lines if s.value == "notice"),
                      "iot-broker logs Mosquitto's connection lines (\"New client connected from ...\", \"Client ... "
                      "disconnected.\") with the packet trace only, log_type \"debug\"; its own lines follow "
                      "[log] level")


def _shown(value: Any) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


# --- TOML -------------------------------------------------------------------------------------

_ORDER = ("host", "port", "max_connections", "max_packet_size", "max_inflight_messages", "max_queued_messages",
          "max_queued_bytes", "sys_interval", "log_type", "allow_zero_length_clientid", "password_file", "acl_file",
          "allow_anonymous", "persistence", "persistence_location", "persistent_client_expiration")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    out = ['"']
    for c in str(value):
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 32 or ord(c) == 127:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join(out) + '"'


def _comment(text: str) -> str:
    return "".join("?" if (ord(c) < 32 and c != "\t") or ord(c) == 127 else c for c in text)


def _keys(keys: list[Key]) -> list[str]:
    out = []
    for k in keys:
        if k.why:
            out.append(f"# {_comment(k.why)}")
        where = f"  # {_comment(k.line.where)}" if k.line is not None else ""
        out.append(f"{k.name} = {_toml(k.value)}{where}")
    return out


def render(source: Path, files: list[str], broker: dict[str, Key], tables: list[dict[str, Key]],
           problems: list[Report], notes: list[Report], bridges: list[dict[str, Key]] = ()) -> str:
    lines = [f"# iot-broker's [broker] section, converted from the Mosquitto configuration {_comment(str(source))}",
             "# by `iotctl broker-config --from-mosquitto`. Files read, in Mosquitto's order:"]
    lines += [f"#   {_comment(f)}" for f in files]
    lines += ["# Use it in place of the [broker] section of iot.toml (the other sections stay as they are).",
              "# Each key names the Mosquitto line it comes from; keys not set keep iot-broker's defaults."]
    for title, reports in ((f"Not converted ({len(problems)})", problems), (f"Notes ({len(notes)})", notes)):
        if reports:
            lines += ["#", f"# {title}:"] + [f"#   {_comment(str(r))}" for r in reports]
    lines += ["", "[broker]"]
    lines += _keys([broker[k] for k in _ORDER if k in broker])
    for t in tables:
        lines += ["", "[[broker.listener]]"] + _keys(list(t.values()))
    for t in bridges:
        lines += ["", "[[broker.bridge]]"] + _keys(list(t.values()))
    return "\n".join(lines) + "\n"


def convert(path: str | os.PathLike, cwd: str | os.PathLike | None = None,
            out: Path | None = None) -> Conversion:
    """Convert the Mosquitto configuration at `path`; `cwd` is the folder Mosquitto runs in
    (relative paths in the file are relative to it). Raises InputError (unreadable input).
    The result's text loads with daemons.config.parse (as if it were the file `out`)."""
    m = read(path, cwd)
    mapper = _Mapper(m)
    broker, tables = mapper.run()
    assert set(broker) <= set(_ORDER), set(broker) - set(_ORDER)
    # Reports in the order Mosquitto reads the lines (the ones about no line first).
    files = {name: i for i, name in enumerate(m.shown)}

    def position(r: Report) -> tuple[int, int]:
        return (-1, 0) if r.line is None else (files.get(r.line.file, len(files)), r.line.number)

    mapper.problems.sort(key=position)
    mapper.notes.sort(key=position)
    text = render(m.main, m.files, broker, tables, mapper.problems, mapper.notes, mapper.bridge_tables)
    try:
        configmod.parse(tomllib.loads(text), out)
    except (tomllib.TOMLDecodeError, configmod.ConfigError) as e:  # our bug, not the user's
        raise AssertionError(f"the converted configuration does not load: {e}\n{text}") from e
    return Conversion(m.main, tuple(m.files), tuple(broker[k] for k in _ORDER if k in broker),
                      tuple(tuple(t.values()) for t in tables), tuple(mapper.problems), tuple(mapper.notes), text)


# --- iotctl broker-config ---------------------------------------------------------------------

DESCRIPTION = """\
Convert a Mosquitto 2 configuration (with the files its include_dir names) into iot-broker's
[broker] section, [[broker.listener]] and [[broker.bridge]] tables, printed or written to OUT. What iot-broker
supports is converted; every other line is listed at the top of the output and on stderr as
FILE:LINE: not converted: OPTION ...: why"""

EPILOG = """\
exit codes: 0 all converted; 1 something not converted (the output is still written);
64 bad usage; 66 the configuration cannot be read; 73 OUT exists (without --force) or
cannot be written."""


def add_commands(sub) -> None:
    p = sub.add_parser("broker-config", help="convert a Mosquitto configuration into the [broker] section",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-mosquitto", metavar="FILE", required=True, help="the Mosquitto configuration (mosquitto.conf)")
    p.add_argument("-o", "--output", metavar="OUT", help="write the result to OUT (atomically) instead of stdout")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--cwd", metavar="DIR",
                   help="the folder Mosquitto runs in: relative paths in FILE are relative to it (default: the "
                        "current folder; Mosquitto's systemd unit runs it in /)")
    p.set_defaults(func=cmd_broker_config)


def cmd_broker_config(args: argparse.Namespace, log: Log) -> int:
    prog = "iotctl broker-config"
    if args.cwd is not None and not os.path.isdir(args.cwd):
        print(f"{prog}: error: --cwd {args.cwd}: not a folder", file=sys.stderr)
        return EX_USAGE
    if args.force and not args.output:
        print(f"{prog}: error: --force needs -o OUT", file=sys.stderr)
        return EX_USAGE
    out = Path(args.output) if args.output else None
    if out is not None and (out.exists() or out.is_symlink()) and not args.force:
        print(f"{prog}: {out} exists: not replaced (--force replaces it)", file=sys.stderr)
        return EX_CANTCREAT
    try:
        conv = convert(args.from_mosquitto, args.cwd, out.resolve() if out else None)
    except InputError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EX_NOINPUT
    for r in conv.problems + conv.notes:
        print(r, file=sys.stderr)
    if out is None:
        sys.stdout.write(conv.text)
        sys.stdout.flush()
    else:
        try:
            atomic_write(out, conv.text.encode())
        except OSError as e:
            print(f"{prog}: cannot write {out}: {e.strerror or e}", file=sys.stderr)
            return EX_CANTCREAT
    return EX_NOT_CONVERTED if conv.problems else 0
