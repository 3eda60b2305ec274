"""`iotctl config show`: the configuration in effect, and where each value came from.

The output is TOML that loads back into the same configuration (secrets aside): a person can
read it, diff it, or keep it as a file. The comment after each key names its source: the
built-in `default`, the `file`, or `environment IOT_...`. Arrays of tables come from the file
or their default as a whole; their source is on each table's header.

Secrets (keys marked "secret": [mqtt] password, [ingest] mysql_password) print as "****" when
set. A password file prints as its path and is never opened here.

A daemon's own flags (iot-broker --port, iot-controller --session, -v, iotctl pub -h/-p) are
that program's business, applied after the config is loaded; this command cannot know which
one a running daemon was given, so it shows default, file and environment, and says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from . import config as configmod

MASK = "****"
# Where the source comments start, unless a row is longer (a long list or table).
_COLUMN = 48


def render(cfg: configmod.Config) -> str:
    where = str(cfg.source) if cfg.source else "no file (built-in defaults)"
    lines = [f"# The configuration in effect: {where}, with the environment's IOT_ variables over it.",
             "# After each key: where its value came from. A daemon's own flags (iot-broker --port,",
             "# iot-controller --session, -v) apply on top and are not shown."]
    for name in configmod.SECTIONS:
        section = getattr(cfg, name)
        rows, tables = [], []
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            origin = cfg.origins.get(f"[{name}] {f.name}", "default")
            if configmod.is_tables(f) and value:
                tables.append((f"{name}.{f.name}", value, origin))
            elif (text := _value(f, value)) is not None:
                rows.append((f"{f.name} = {text}", origin))
        width = max((len(r) for r, _ in rows if len(r) <= _COLUMN), default=0)
        lines += ["", f"[{name}]"] + [f"{r:<{width}}  # {origin}" for r, origin in rows]
        for label, items, origin in tables:
            for item in items:
                lines += _table(label, item, f"  # {origin}")
    return "\n".join(lines) + "\n"


def _table(label: str, item: Any, comment: str = "") -> list[str]:
    """One `[[label]]` table; its own arrays of tables follow it as `[[label.key]]`."""
    lines, nested = ["", f"[[{label}]]{comment}"], []
    for f in dataclasses.fields(item):
        value = getattr(item, f.name)
        if configmod.is_tables(f):
            nested += [line for sub in value for line in _table(f"{label}.{f.name}", sub)]
        elif (text := _value(f, value)) is not None:
            lines.append(f"{f.name} = {text}")
    return lines + nested


def _value(f: dataclasses.Field, value: Any) -> str | None:
    """`value` in TOML; None for an unset key that has no TOML spelling (a listener's
    allow_anonymous, a sensor's alarm_high), which is left out as the file would leave it."""
    if f.metadata.get("secret") and value:
        return _string(MASK)
    if value is None:
        return '""' if "Path" in str(f.type) else None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return _string(str(value))
    if isinstance(value, tuple):
        return "[" + ", ".join(_string(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_string(k)} = {v!r}" for k, v in value.items()) + "}"
    raise AssertionError(f"config field {f.name} has a value show cannot write: {value!r}")  # our bug


_ESCAPES = {'"': '\\"', "\\": "\\\\"}


def _string(text: str) -> str:
    # A TOML basic string: quote, backslash and control characters escaped.
    return '"' + "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if c < " " or c == "\x7f" else c)
                         for c in text) + '"'


def cmd_show(args: argparse.Namespace, log) -> int:
    sys.stdout.write(render(configmod.load(args.config)))
    return 0


def add_commands(sub) -> None:
    c = sub.add_parser("config", help="the configuration in effect",
                       description="The configuration the daemons load: the file, the environment over it.")
    csub = c.add_subparsers(dest="config_command", metavar="ACTION", required=True, parser_class=type(c))
    p = csub.add_parser("show", help="every key's value and where it came from (default, file, environment)",
                        description="Print the configuration in effect as TOML: the file (--config, $IOT_CONFIG, "
                                    "etc/iot/iot.toml in a checkout, /etc/iot/iot.toml) with the IOT_<SECTION>_<KEY> "
                                    "environment variables over it; after each key, where its value came from. "
                                    "Passwords print as ****; password files are not read. A daemon's own flags "
                                    "(iot-broker --port, iot-controller --session, -v) apply on top and are not shown.")
    p.add_argument("--config", metavar="FILE")
    p.set_defaults(func=cmd_show)
