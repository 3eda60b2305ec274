"""`iotctl passwd`: manage a broker password file, as `mosquitto_passwd` 2.0 does, and in the
same format, so the file works with iot-broker and with Mosquitto alike (see auth.py).

Where it differs from mosquitto_passwd, it is to be safer: the file is replaced atomically
(`durable.atomic_write`: a crash leaves the old file or the new one, never half of one) rather
than rewritten in place; comments and blank lines are kept rather than refused; `-U` leaves
entries that are already hashed alone rather than hashing their hashes; a new file is created
with mode 0600 (an existing file keeps its mode and, where we may, its owner).

Exit codes: 0 done; 1 failed (file unreadable or corrupt, user not found, passwords differ);
64 bad usage (including no terminal to ask the password on without -b).
"""

from __future__ import annotations

import argparse
import getpass
import os
import stat
import sys
from pathlib import Path

from ..durable import atomic_write
from ..service import EX_USAGE, Log
from .auth import PBKDF2_ITERATIONS, hash_password, parse_hash, split_entry

EX_FAIL = 1

DESCRIPTION = """\
Add, change or delete a user in a password file of Mosquitto's format, which iot-broker
([broker] password_file) and Mosquitto (password_file) both read. Like mosquitto_passwd:

  iotctl passwd -c FILE USER           create FILE (replacing it) with USER; asks the password
  iotctl passwd FILE USER              add USER or change USER's password; asks the password
  iotctl passwd -b FILE USER PASSWORD  the same, password on the command line (batch mode)
  iotctl passwd -D FILE USER           delete USER
  iotctl passwd -U FILE                hash the plain-text passwords of FILE (user:password lines)

Without -b the password is asked twice, without echo, on the terminal. With -b it shows in
the process list and the shell history: use it for scripts that take it from a safe place.
Passwords are stored as $7$ (PBKDF2-SHA512, 101 iterations, as mosquitto_passwd 2.0 writes)."""

EPILOG = """\
exit codes: 0 done; 1 failed (unreadable or corrupt file, no such user, passwords differ);
64 bad usage. The broker reads a changed file on SIGHUP (systemctl reload iot-broker)."""


class _Failure(Exception):
    def __init__(self, message: str, code: int = EX_FAIL):
        super().__init__(message)
        self.code = code


def add_commands(sub) -> None:
    p = sub.add_parser("passwd", help="add, change or delete a broker user (like mosquitto_passwd)",
                       description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", dest="create", action="store_true", help="create FILE, replacing any file there")
    p.add_argument("-b", dest="batch", action="store_true", help="batch mode: PASSWORD is on the command line")
    p.add_argument("-D", dest="delete", action="store_true", help="delete USER")
    p.add_argument("-U", dest="upgrade", action="store_true",
                   help="hash the plain-text passwords of FILE (entries already hashed are kept)")
    p.add_argument("-H", dest="hash", choices=("sha512-pbkdf2", "sha512"), default="sha512-pbkdf2",
                   help="hash to write: sha512-pbkdf2 ($7$, the default) or sha512 ($6$, for Mosquitto 1.x)")
    p.add_argument("-I", dest="iterations", type=int, default=PBKDF2_ITERATIONS, metavar="N",
                   help=f"PBKDF2 iterations (default {PBKDF2_ITERATIONS}, as mosquitto_passwd)")
    p.add_argument("file", metavar="FILE", help="the password file")
    p.add_argument("user", metavar="USER", nargs="?", help="the user name (not with -U)")
    p.add_argument("password", metavar="PASSWORD", nargs="?", help="the password (only with -b)")
    p.set_defaults(func=cmd_passwd)


def _usage_problem(args: argparse.Namespace) -> str | None:
    for a, b, names in ((args.create, args.delete, "-c and -D"), (args.create, args.upgrade, "-c and -U"),
                        (args.delete, args.upgrade, "-D and -U"), (args.batch, args.delete, "-b and -D"),
                        (args.batch, args.upgrade, "-b and -U")):
        if a and b:
            return f"{names} cannot be used together"
    if args.iterations < 1:
        return "-I: the number of iterations must be at least 1"
    if args.upgrade:
        if args.user is not None:
            return "-U takes only FILE (it hashes every user's plain-text password)"
        return None
    if args.user is None:
        return "USER is missing"
    if args.delete and args.password is not None:
        return "-D takes only FILE USER"
    if args.batch and args.password is None:
        return "-b needs PASSWORD after USER"
    if not args.batch and args.password is not None:
        return "a PASSWORD on the command line needs -b (or leave it out to be asked for it)"
    if ":" in args.user:
        return "a user name may not contain ':'"
    if not args.user or args.user != args.user.strip():
        return "a user name may not be empty or begin or end with blanks"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in args.user):
        return "a user name may not contain control characters"
    if len(args.user.encode()) > 65535:
        return "a user name must be shorter than 65536 bytes"
    if args.password is not None and len(args.password.encode()) > 65535:
        return "a password must be shorter than 65536 bytes"
    return None


def _ask_password() -> bytes:
    if not sys.stdin.isatty():
        raise _Failure("no terminal to ask the password on: give it with -b FILE USER PASSWORD "
                       "(it then shows in the process list and the shell history)", EX_USAGE)
    try:
        first = getpass.getpass("Password: ")
        second = getpass.getpass("Reenter password: ")
    except EOFError:
        raise _Failure("no password given; nothing changed") from None
    if first != second:
        raise _Failure("the passwords do not match; nothing changed")
    return first.encode()


def _read(path: Path) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise _Failure(f"{path} does not exist (-c creates it)") from None
    except OSError as e:
        raise _Failure(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise _Failure(f"{path} is not a password file (not UTF-8 text)") from None
    lines = [line.rstrip("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _entries(path: Path, lines: list[str]) -> list[tuple[str, str] | None]:
    """split_entry() of every line; a line that is no `user:...` entry fails with its number."""
    out = []
    for number, line in enumerate(lines, 1):
        try:
            out.append(split_entry(line))
        except ValueError as e:
            raise _Failure(f"{path}:{number}: {e}; nothing changed") from None
    return out


def _write(path: Path, lines: list[str]) -> None:
    """Replace the file atomically. A new file is 0600 from its first byte (umask 077 around
    the write); an existing one gets its mode back, and its owner where we may set it."""
    try:
        before = path.stat()
    except FileNotFoundError:
        before = None
    except OSError as e:
        raise _Failure(f"cannot write {path}: {e.strerror or e}") from None
    data = "".join(line + "\n" for line in lines).encode()
    umask = os.umask(0o077)
    try:
        atomic_write(path, data)
    except OSError as e:
        raise _Failure(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        os.umask(umask)
    if before is None:
        return
    now = path.stat()
    if (now.st_uid, now.st_gid) != (before.st_uid, before.st_gid):
        try:
            os.chown(path, before.st_uid, before.st_gid)
        except PermissionError:
            print(f"iotctl passwd: warning: {path} now belongs to uid {now.st_uid} gid {now.st_gid}, "
                  f"was uid {before.st_uid} gid {before.st_gid} (not allowed to give it back)", file=sys.stderr)
    os.chmod(path, stat.S_IMODE(before.st_mode))


def _new_line(args: argparse.Namespace, user: str, password: bytes) -> str:
    return f"{user}:{hash_password(password, args.iterations, sha512=args.hash == 'sha512')}"


def _set_user(args: argparse.Namespace, path: Path, password: bytes) -> None:
    lines = [] if args.create else _read(path)
    entries = _entries(path, lines)
    out, done = [], False
    for line, entry in zip(lines, entries):
        if entry is not None and entry[0] == args.user:
            if not done:  # the first entry is changed in place; a duplicate is dropped
                out.append(_new_line(args, args.user, password))
                done = True
            continue
        out.append(line)
    if not done:
        out.append(_new_line(args, args.user, password))
    _write(path, out)


def _delete_user(path: Path, user: str) -> None:
    lines = _read(path)
    entries = _entries(path, lines)
    out = [line for line, entry in zip(lines, entries) if entry is None or entry[0] != user]
    if len(out) == len(lines):
        raise _Failure(f"user {user!r} is not in {path}; nothing changed")
    _write(path, out)


def _upgrade(args: argparse.Namespace, path: Path) -> None:
    lines = _read(path)
    entries = _entries(path, lines)
    out, kept = [], 0
    for number, (line, entry) in enumerate(zip(lines, entries), 1):
        if entry is None:
            out.append(line)
            continue
        user, rest = entry
        try:
            parse_hash(rest)
            out.append(line)
            kept += 1
            continue
        except ValueError:
            pass
        # The password as mosquitto_passwd -U (and Mosquitto 1.x's plain-text check) reads it:
        # the first non-empty ':'-separated field after the user name, blanks trimmed.
        password = next((field for field in rest.split(":") if field), "").strip()
        if not password:
            raise _Failure(f"{path}:{number}: no password for user {user!r}; nothing changed")
        out.append(_new_line(args, user, password.encode()))
    _write(path, out)
    if kept:
        print(f"iotctl passwd: {kept} entr{'y was' if kept == 1 else 'ies were'} hashed already "
              f"and kept as {'it was' if kept == 1 else 'they were'}", file=sys.stderr)


def cmd_passwd(args: argparse.Namespace, log: Log) -> int:
    problem = _usage_problem(args)
    if problem:
        print(f"iotctl passwd: error: {problem} (see iotctl passwd --help)", file=sys.stderr)
        return EX_USAGE
    # Through a symlink, change the file it points to (mosquitto_passwd resolves it too).
    path = Path(os.path.realpath(args.file))
    try:
        if args.upgrade:
            _upgrade(args, path)
        elif args.delete:
            _delete_user(path, args.user)
        else:
            password = args.password.encode() if args.batch else _ask_password()
            _set_user(args, path, password)
    except _Failure as e:
        print(f"iotctl passwd: {e}", file=sys.stderr)
        return e.code
    return 0
