"""Who may connect and what they may touch: Mosquitto's password file and ACL file, read as
Mosquitto 2.0 reads them, so a file written for Mosquitto works here unchanged.

Pure apart from the two `load()` class methods, which read a file: the broker loads them at
start and on SIGHUP, and on an `AuthFileError` keeps the rules it had.

Password file
=============

One `user:hash` per line, as `mosquitto_passwd` writes it (`iotctl passwd` writes the same):

    $7$ITERATIONS$SALT$HASH   PBKDF2-HMAC-SHA512 (mosquitto_passwd 2.0's default, 101 iterations)
    $6$SALT$HASH              SHA512(password + salt) (mosquitto_passwd -H sha512; Mosquitto 1.x)

SALT and HASH are standard base64; the salt is 12 bytes (64 accepted, as Mosquitto 2.1 writes),
the hash 64. (Mosquitto 2.0: `output_new_password` in apps/mosquitto_passwd/mosquitto_passwd.c,
`pw__hash` in src/password_mosq.c, `pwfile__parse` and `unpwd__decode_passwords` in
src/security_default.c.) Blank lines and `#` comments are ignored. Where Mosquitto logs a bad
line and drops it, we refuse the whole file with the file, the line and what was expected: a
half-loaded password file locks people out silently.

`check()` computes exactly one hash for every attempt: for an unknown user it hashes against
a dummy entry of the kind and iteration count most entries have, so the time a refusal takes
does not tell which user names exist. The digests are compared with `hmac.compare_digest`.

ACL file (mosquitto.conf(5), acl_file)
======================================

    # comment
    topic [read|write|readwrite|deny] FILTER     no access word = readwrite
    user NAME                                    the rules after it are NAME's
    pattern [read|write|readwrite|deny] FILTER   %c = client id, %u = user name; for everyone

Fields are separated by spaces; FILTER is everything after the access word, so it may contain
spaces (with the access word omitted, FILTER is the one word after `topic`). `topic` lines
before the first `user` line are the anonymous clients' (no user name); `pattern` lines apply
to every client wherever they stand. Two `user` blocks of one name are merged.

A decision follows Mosquitto 2.0's `mosquitto_acl_check_default` (src/security_default.c):

1. The client's own rules (its user's block, or the anonymous block): a matching `deny` rule
   refuses; otherwise a matching rule that grants the access allows. Either ends the check.
2. Only if there are `pattern` lines: a client whose user name or client id contains `+` or `#`
   is refused outright (CVE-2017-7650: such a name would turn `%u`/`%c` into a wildcard). A `/`
   is allowed, as Mosquitto allows it since 1.5: it only adds levels under the client's own
   prefix, it cannot reach past it.
3. The patterns with `%c`/`%u` substituted (a pattern with `%u` never applies to a client
   without a user name): a matching `deny` refuses, a matching grant allows.
4. Otherwise refused. A file with no rules at all refuses everything (Mosquitto 2.0 does the
   same since CVE-2018-12550); "no ACL file, everything allowed" is the broker's decision.

So a user's own grant wins over a `deny` pattern: as in Mosquitto, `deny` overrides grants
of its own kind (topic or pattern), not the other kind.

Topics are matched against rule filters with MQTT wildcard rules (via the subscription tree
of `topics`, so a check costs the topic's depth, not the number of rules); a `$` topic is only
matched by a rule whose filter starts with `$`.

SUBSCRIBE: Mosquitto 2.0 with an acl_file grants every subscription and checks read access
per message when it delivers (its check returns success for MOSQ_ACL_SUBSCRIBE: "FIXME -
implement ACL subscription strings"). Ours answers SUBACK 0x80 only where Mosquitto would
deliver nothing ever: a subscription is granted if some read rule's filter overlaps it (a
topic exists that both match), and refused if a `deny` rule covers it all (`covers`, level by
level, Mosquitto's dynamic-security `sub_acl_check`). With `topic read sensors/+/temp`,
`sensors/a/temp`, `sensors/#` and `#` are granted (and only the `.../temp` messages are
delivered, checked by `can_read`, as Mosquitto does), `other/#` and `sensors/a/temp/x` get
0x80. So a client gets the same messages from both brokers, and a SUBACK that says when a
subscription can never deliver anything.

Expanded pattern rules are cached per (client id, user name), a bounded number of clients.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .topics import InvalidTopic, SubscriptionTree, validate_topic_filter

__all__ = ["Acl", "AclRule", "AuthFileError", "ClientAcl", "PasswordFile", "hash_password"]

# Access bits as Mosquitto numbers them (MOSQ_ACL_NONE/READ/WRITE); "deny" is NONE.
DENY, READ, WRITE = 0, 1, 2
_ACCESS_WORDS = {"read": READ, "write": WRITE, "readwrite": READ | WRITE, "deny": DENY}

PBKDF2_ITERATIONS = 101  # PW_DEFAULT_ITERATIONS of mosquitto_passwd 2.0
SALT_BYTES = 12  # SALT_LEN of mosquitto_passwd 2.0; 2.0 brokers accept no other length
_HASH_BYTES = 64  # SHA512
_SALT_LENGTHS = (12, 64)  # 64: what Mosquitto 2.1 writes

_PATTERN_VARIABLE = re.compile(r"%[cu]")
_DANGEROUS = frozenset("+#\x00")  # in a name that a pattern would substitute
_CACHE_CLIENTS = 1024


class AuthFileError(Exception):
    """A password or ACL file that cannot be used; str() is "FILE:LINE: problem"."""

    def __init__(self, path: Path | str, line: int | None, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {problem}")


def _read_lines(path: Path) -> list[str]:
    """The file's lines, decoded; an unreadable file or a line that is not UTF-8 is an
    AuthFileError like any other bad line."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise AuthFileError(path, None, f"cannot read: {e.strerror or e}") from None
    lines = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            lines.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError:
            raise AuthFileError(path, number, "not valid UTF-8") from None
    return lines


# --- password file ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Hash:
    """One parsed `$6$`/`$7$` entry. iterations is 0 for `$6$`."""

    kind: int
    iterations: int
    salt: bytes
    digest: bytes

    def compute(self, password: bytes) -> bytes:
        if self.kind == 7:
            return hashlib.pbkdf2_hmac("sha512", password, self.salt, self.iterations, _HASH_BYTES)
        return hashlib.sha512(password + self.salt).digest()

    def encode(self) -> str:
        salt = base64.b64encode(self.salt).decode()
        digest = base64.b64encode(self.digest).decode()
        if self.kind == 7:
            return f"$7${self.iterations}${salt}${digest}"
        return f"$6${salt}${digest}"


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the {what} {text!r} is not base64") from None


def parse_hash(text: str) -> _Hash:
    """Parse `$7$ITERATIONS$SALT$HASH` or `$6$SALT$HASH`; ValueError says what is wrong."""
    if text.startswith("$7$"):
        fields = text[3:].split("$")
        if len(fields) != 3:
            raise ValueError("expected $7$ITERATIONS$SALT$HASH")
        iterations_text, salt_text, digest_text = fields
        if not iterations_text.isascii() or not iterations_text.isdigit() or int(iterations_text) < 1:
            raise ValueError(f"the iteration count {iterations_text!r} is not a positive number")
        kind, iterations = 7, int(iterations_text)
    elif text.startswith("$6$"):
        fields = text[3:].split("$")
        if len(fields) != 2:
            raise ValueError("expected $6$SALT$HASH")
        salt_text, digest_text = fields
        kind, iterations = 6, 0
    elif not text.startswith("$"):
        raise ValueError("the password is not hashed (a plain-text file? `iotctl passwd -U FILE` hashes it)")
    else:
        raise ValueError("unknown hash type: expected $7$ (PBKDF2-SHA512) or $6$ (SHA512) as mosquitto_passwd writes")
    salt = _b64(salt_text, "salt")
    if len(salt) not in _SALT_LENGTHS:
        raise ValueError(f"the salt is {len(salt)} bytes, expected 12 (or 64)")
    digest = _b64(digest_text, "hash")
    if len(digest) != _HASH_BYTES:
        raise ValueError(f"the hash is {len(digest)} bytes, expected {_HASH_BYTES}")
    return _Hash(kind, iterations, salt, digest)


def hash_password(password: bytes, iterations: int = PBKDF2_ITERATIONS, sha512: bool = False) -> str:
    """A fresh hash as mosquitto_passwd 2.0 writes it: `$7$101$SALT$HASH` with a random 12-byte
    salt, or with `sha512=True` the old `$6$SALT$HASH` (mosquitto_passwd -H sha512)."""
    salt = os.urandom(SALT_BYTES)
    if sha512:
        entry = _Hash(6, 0, salt, b"")
    else:
        if iterations < 1:
            raise ValueError(f"iterations must be at least 1, not {iterations}")
        entry = _Hash(7, iterations, salt, b"")
    return _Hash(entry.kind, entry.iterations, salt, entry.compute(password)).encode()


def split_entry(line: str) -> tuple[str, str] | None:
    """(user, rest) of a `user:rest` line, both stripped as Mosquitto strips them; None for a
    blank or `#` comment line. ValueError for a line that is neither."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    user, colon, rest = line.partition(":")
    if not colon:
        raise ValueError("expected USER:HASH, found no ':'")
    user = user.strip()
    if not user:
        raise ValueError("expected USER:HASH, found no user name before ':'")
    return user, rest.strip()


class PasswordFile:
    """User names and their password hashes, from a Mosquitto password file."""

    __slots__ = ("_users", "_dummy")

    def __init__(self, users: dict[str, _Hash]):
        self._users = dict(users)
        # The dummy an unknown user is checked against costs what most real entries cost.
        kinds = Counter((h.kind, h.iterations) for h in self._users.values())
        kind, iterations = kinds.most_common(1)[0][0] if kinds else (7, PBKDF2_ITERATIONS)
        self._dummy = _Hash(kind, iterations, os.urandom(SALT_BYTES), bytes(_HASH_BYTES))

    @classmethod
    def load(cls, path: Path) -> PasswordFile:
        return cls.parse(_read_lines(path), path)

    @classmethod
    def parse(cls, lines: list[str], path: Path | str = "<password file>") -> PasswordFile:
        users: dict[str, _Hash] = {}
        first_line: dict[str, int] = {}
        for number, line in enumerate(lines, 1):
            try:
                entry = split_entry(line)
                if entry is None:
                    continue
                user, rest = entry
                if not rest:
                    raise ValueError(f"no password hash for user {user!r}")
                if user in users:
                    raise ValueError(f"user {user!r} again (first on line {first_line[user]})")
                try:
                    users[user] = parse_hash(rest)
                except ValueError as e:
                    raise ValueError(f"user {user!r}: {e}") from None
                first_line[user] = number
            except ValueError as e:
                raise AuthFileError(path, number, str(e)) from None
        return cls(users)

    def check(self, username: str, password: bytes | None) -> bool:
        """Whether `password` is `username`'s. Always one hash computation and a
        constant-time comparison, whether the user exists or not."""
        entry = self._users.get(username)
        target = self._dummy if entry is None else entry
        computed = target.compute(b"" if password is None else password)
        same = hmac.compare_digest(computed, target.digest)
        return same and entry is not None and password is not None

    def __contains__(self, username: object) -> bool:
        return username in self._users

    def __len__(self) -> int:
        return len(self._users)


# --- ACL ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AclRule:
    """One `topic` or `pattern` line. user is the block it stands in (None: anonymous; for a
    pattern, where it stood, which does not limit it)."""

    pattern: bool
    access: int  # DENY, READ, WRITE or READ | WRITE
    filter: str
    user: str | None
    line: int


def covers(rule_filter: str, topic_filter: str) -> bool:
    """Whether every topic `topic_filter` can match is matched by `rule_filter`, judged level
    by level: a `+` in the rule covers any one level of the filter (a `+` too, not a `#`), a
    `#` in the rule covers the rest, a literal level covers only itself. `a/#` covers `a`, as
    it matches the topic `a`; `+/#` covers `#`. A `$` filter is only covered by a `$` rule.

    This is Mosquitto's dynamic-security `sub_acl_check`, with one difference: for it, `/#`
    covers `#` (its "#" and "/#" both become the empty level); here it does not."""
    if (rule_filter[:1] == "$") != (topic_filter[:1] == "$"):
        return False
    rule, sub = rule_filter.split("/"), topic_filter.split("/")
    for index, level in enumerate(rule):
        if level == "#":
            return True
        if index == len(sub):
            return False
        if sub[index] == "#":
            # Only a "#" in the rule covers it (above), or "+/#" for the filter "#": every
            # topic has a first level, so "+/#" matches every topic "#" does.
            return index == 0 and rule == ["+", "#"]
        if level != "+" and level != sub[index]:
            return False
    return len(sub) == len(rule)


def overlaps(a: str, b: str) -> bool:
    """Whether some topic matches both filters. A filter starting with a wildcard matches no
    `$` topic [MQTT-4.7.2-1]."""
    x, y = a.split("/"), b.split("/")
    if (x[0][:1] == "$" and y[0] in ("+", "#")) or (y[0][:1] == "$" and x[0] in ("+", "#")):
        return False
    for i in range(max(len(x), len(y))):
        p = x[i] if i < len(x) else None
        q = y[i] if i < len(y) else None
        if p == "#" or q == "#":
            return True
        if p is None or q is None:
            return False  # one has more levels and the other ends without "#"
        if p != "+" and q != "+" and p != q:
            return False
    return True


class _RuleSet:
    """The rules that apply in one step of a decision, with their filters in a subscription
    tree (subscriber = the rule's index) so a topic is matched in one walk."""

    __slots__ = ("rules", "tree")

    def __init__(self, rules: list[tuple[int, str]]):
        self.rules = tuple(rules)
        self.tree = SubscriptionTree()
        for index, (_, topic_filter) in enumerate(self.rules):
            self.tree.subscribe(index, topic_filter, 0)

    def topic(self, topic: str, bit: int) -> bool | None:
        """False if a deny rule matches `topic`, True if a rule granting `bit` does, else None."""
        granted = False
        for index in self.tree.match(topic):
            access = self.rules[index][0]
            if access == DENY:
                return False
            if access & bit:
                granted = True
        return True if granted else None

    def subscription(self, topic_filter: str, bit: int) -> bool | None:
        """False if a deny rule covers the whole filter, True if a rule granting `bit` could
        match some topic of it, else None (subscriptions are rare: a scan)."""
        granted = False
        for access, rule_filter in self.rules:
            if access == DENY:
                if covers(rule_filter, topic_filter):
                    return False
            elif access & bit and not granted:
                granted = overlaps(rule_filter, topic_filter)
        return True if granted else None


_EMPTY = _RuleSet([])


class ClientAcl:
    """One client's rights under an Acl: its user's rules and its expanded patterns. A
    connection may keep one; it stays valid as long as the Acl it came from."""

    __slots__ = ("_own", "_patterns")

    def __init__(self, own: _RuleSet | None, patterns: _RuleSet | None):
        # patterns None: the client is refused past its own rules (a dangerous name).
        self._own, self._patterns = own, patterns

    def _decide(self, step: Callable[[_RuleSet], bool | None]) -> bool:
        if self._own is not None:
            verdict = step(self._own)
            if verdict is not None:
                return verdict
        if self._patterns is None:
            return False
        return step(self._patterns) is True

    def can_read(self, topic: str) -> bool:
        return self._decide(lambda rules: rules.topic(topic, READ))

    def can_write(self, topic: str) -> bool:
        return self._decide(lambda rules: rules.topic(topic, WRITE))

    def can_subscribe(self, topic_filter: str) -> bool:
        return self._decide(lambda rules: rules.subscription(topic_filter, READ))


class Acl:
    """The rules of a Mosquitto ACL file. Immutable: a reload builds a new one."""

    __slots__ = ("rules", "_users", "_patterns", "_clients")

    def __init__(self, rules: list[AclRule]):
        self.rules = tuple(rules)
        blocks: dict[str | None, list[tuple[int, str]]] = {}
        for rule in self.rules:
            if not rule.pattern:
                blocks.setdefault(rule.user, []).append((rule.access, rule.filter))
        self._users = {user: _RuleSet(block) for user, block in blocks.items()}
        self._patterns = tuple(r for r in self.rules if r.pattern)
        self._clients: dict[tuple[str, str | None], ClientAcl] = {}

    @classmethod
    def load(cls, path: Path) -> Acl:
        return cls.parse(_read_lines(path), path)

    @classmethod
    def parse(cls, lines: list[str], path: Path | str = "<acl file>") -> Acl:
        rules: list[AclRule] = []
        user: str | None = None
        for number, line in enumerate(lines, 1):
            try:
                parsed = _parse_acl_line(line)
            except ValueError as e:
                raise AuthFileError(path, number, str(e)) from None
            if parsed is None:
                continue
            keyword, access, value = parsed
            if keyword == "user":
                user = value
            else:
                rules.append(AclRule(keyword == "pattern", access, value, user, number))
        return cls(rules)

    def for_client(self, client_id: str, username: str | None) -> ClientAcl:
        """The rights of one client, built once per (client id, user name) and cached."""
        key = (client_id, username)
        found = self._clients.get(key)
        if found is None:
            found = ClientAcl(self._users.get(username), self._expand(client_id, username))
            if len(self._clients) >= _CACHE_CLIENTS:
                del self._clients[next(iter(self._clients))]  # the oldest entry
            self._clients[key] = found
        return found

    def _expand(self, client_id: str, username: str | None) -> _RuleSet | None:
        if not self._patterns:
            return _EMPTY
        if _DANGEROUS.intersection(client_id) or (username is not None and _DANGEROUS.intersection(username)):
            return None
        expanded = []
        for rule in self._patterns:
            if username is None and "%u" in rule.filter:
                continue
            names = {"%c": client_id, "%u": username}
            topic_filter = _PATTERN_VARIABLE.sub(lambda m: names[m.group()], rule.filter)
            try:
                validate_topic_filter(topic_filter)
            except InvalidTopic:
                if rule.access == DENY:
                    return None  # a deny we cannot apply must not turn into an allow
                continue
            expanded.append((rule.access, topic_filter))
        return _RuleSet(expanded)

    def can_read(self, client_id: str, username: str | None, topic: str) -> bool:
        """May this client receive a message published to `topic`?"""
        return self.for_client(client_id, username).can_read(topic)

    def can_write(self, client_id: str, username: str | None, topic: str) -> bool:
        """May this client publish to `topic` (or have its will published there)?"""
        return self.for_client(client_id, username).can_write(topic)

    def can_subscribe(self, client_id: str, username: str | None, topic_filter: str) -> bool:
        """May this client subscribe to `topic_filter` (else SUBACK 0x80)? See the module
        docstring: read rules must cover the filter."""
        return self.for_client(client_id, username).can_subscribe(topic_filter)


def _parse_acl_line(line: str) -> tuple[str, int, str] | None:
    """(keyword, access, value) of one ACL line, None for a blank or comment line. Split as
    Mosquitto's aclfile__parse splits it: on spaces, the rest of the line kept whole."""
    text = line.rstrip()
    if not text.lstrip(" ") or text.lstrip(" ").startswith("#"):
        return None
    keyword, _, rest = text.lstrip(" ").partition(" ")
    rest = rest.lstrip(" ")
    if keyword == "user":
        name = rest.strip()
        if not name:
            raise ValueError("expected 'user NAME', found no name")
        return "user", 0, name
    if keyword not in ("topic", "pattern"):
        hint = " (fields are separated by spaces, not tabs)" if "\t" in keyword else ""
        raise ValueError(f"expected 'topic', 'pattern', 'user' or a # comment, found {keyword!r}{hint}")
    if not rest:
        raise ValueError(f"expected '{keyword} [read|write|readwrite|deny] FILTER', found no filter")
    word, _, topic_filter = rest.partition(" ")
    topic_filter = topic_filter.strip()
    if not topic_filter:
        # One word: it is the filter, with readwrite access (so `topic read` alone is the topic "read").
        word, topic_filter = "readwrite", word
    access = _ACCESS_WORDS.get(word)
    if access is None:
        raise ValueError(f"unknown access {word!r}: expected read, write, readwrite or deny "
                         f"(a filter with spaces needs the access word before it)")
    try:
        validate_topic_filter(topic_filter)
    except InvalidTopic as e:
        raise ValueError(f"invalid filter {topic_filter!r}: {e}") from None
    return keyword, access, topic_filter
