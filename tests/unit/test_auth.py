"""auth.py: password files as Debian's mosquitto_passwd writes them, and ACL decisions as
Mosquitto 2.0 makes them (tests/integration/test_auth_mosquitto.py holds the same rules
against a running Mosquitto)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from daemons.broker import auth
from daemons.broker.auth import Acl, AuthFileError, PasswordFile, covers, hash_password

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
needs_mosquitto_passwd = pytest.mark.skipif(not Path(MOSQUITTO_PASSWD).exists(),
                                            reason="mosquitto_passwd not installed (install.sh --test-deps)")


def mosquitto_passwd(*args: str) -> None:
    subprocess.run([MOSQUITTO_PASSWD, *args], check=True, capture_output=True, timeout=30)


# --- password files from mosquitto_passwd -------------------------------------------------


@needs_mosquitto_passwd
def test_a_file_mosquitto_passwd_created_checks_right_wrong_and_unknown(tmp_path):
    f = tmp_path / "passwd"
    mosquitto_passwd("-c", "-b", str(f), "alice", "s3cret")
    assert re.fullmatch(r"alice:\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==\n", f.read_text())
    pw = PasswordFile.load(f)
    assert len(pw) == 1 and "alice" in pw and "bob" not in pw
    assert pw.check("alice", b"s3cret")
    assert not pw.check("alice", b"s3cret ")
    assert not pw.check("alice", b"")
    assert not pw.check("alice", None)
    assert not pw.check("bob", b"s3cret")


@needs_mosquitto_passwd
def test_several_users_added_and_changed_by_mosquitto_passwd(tmp_path):
    f = tmp_path / "passwd"
    mosquitto_passwd("-c", "-b", str(f), "alice", "a-pass")
    mosquitto_passwd("-b", str(f), "bob", "b pass with spaces")
    mosquitto_passwd("-b", str(f), "carol smith", "ünïcødé")
    mosquitto_passwd("-b", str(f), "alice", "a-new")  # changed in place
    mosquitto_passwd("-H", "sha512", "-b", str(f), "old", "six")  # $6$, Mosquitto 1.x's hash
    mosquitto_passwd("-I", "7", "-b", str(f), "few", "iterations")
    assert "old:$6$" in f.read_text() and "few:$7$7$" in f.read_text()
    pw = PasswordFile.load(f)
    assert len(pw) == 5
    for user, good in [("alice", "a-new"), ("bob", "b pass with spaces"), ("carol smith", "ünïcødé"),
                       ("old", "six"), ("few", "iterations")]:
        assert pw.check(user, good.encode()), user
        assert not pw.check(user, b"x" + good.encode()), user
    assert not pw.check("alice", b"a-pass")


@needs_mosquitto_passwd
def test_a_plain_file_hashed_by_mosquitto_passwd_U(tmp_path):
    f = tmp_path / "passwd"
    # mosquitto_passwd -U takes the first ':'-field after the user, blanks trimmed.
    f.write_text("alice:apass\nbob: bpass : ignored\n")
    mosquitto_passwd("-U", str(f))
    pw = PasswordFile.load(f)
    assert pw.check("alice", b"apass") and pw.check("bob", b"bpass")
    assert not pw.check("bob", b" bpass ") and not pw.check("bob", b"bpass : ignored")


# Lines mosquitto_passwd 2.0.11 wrote (Debian bookworm); the $6$ one checked by hand below.
SIX_LINE = "u:$6$WNnrlFO+Cw9lI/CM$kBshvLuaaqMSTJCHUPla0XPs0VSY2TmRofm8wf06XjfNKUxKiFNQOpXQhWXpJ20cv1xo/g5SGvtGsEj++N9cAg=="
SEVEN_LINE = "u:$7$5$UIR49ViGJmuIkB+P$xi8ZtN6oSt7FOMP5Anal2UtaXqGyOtmomzK1joA6DuljA5a1/pyRADynINwJdC/SQgC/qdA4bmwrRMSv7F8NHA=="


def test_six_is_sha512_of_password_then_salt_not_sha512_crypt():
    # Mosquitto's pw__hash for $6$: one SHA512 over the password followed by the raw salt.
    salt = base64.b64decode("WNnrlFO+Cw9lI/CM")
    assert len(salt) == 12
    expected = base64.b64decode(SIX_LINE.rsplit("$", 1)[1])
    assert hashlib.sha512(b"p" + salt).digest() == expected
    assert hashlib.sha512(salt + b"p").digest() != expected
    pw = PasswordFile.parse([SIX_LINE])
    assert pw.check("u", b"p") and not pw.check("u", b"P")


def test_seven_is_pbkdf2_sha512_with_the_iterations_of_the_line():
    salt = base64.b64decode("UIR49ViGJmuIkB+P")
    expected = base64.b64decode(SEVEN_LINE.rsplit("$", 1)[1])
    assert hashlib.pbkdf2_hmac("sha512", b"p", salt, 5, 64) == expected
    pw = PasswordFile.parse([SEVEN_LINE])
    assert pw.check("u", b"p") and not pw.check("u", b"q")


def test_hash_password_writes_what_mosquitto_passwd_2_0_writes():
    line = hash_password(b"pw")
    assert re.fullmatch(r"\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==", line)
    assert line != hash_password(b"pw"), "a fresh salt each time"
    assert re.fullmatch(r"\$7\$9\$.{16}\$.{88}", hash_password(b"pw", iterations=9))
    assert re.fullmatch(r"\$6\$.{16}\$.{88}", hash_password(b"pw", sha512=True))
    pw = PasswordFile.parse([f"a:{hash_password(b'pw')}", f"b:{hash_password(b'pw', sha512=True)}"])
    assert pw.check("a", b"pw") and pw.check("b", b"pw")


def test_blank_lines_comments_and_blanks_around_fields_are_ignored():
    pw = PasswordFile.parse(["", "# users", "   ", f"  alice :  {hash_password(b'x')}  \r", "  # indented"])
    assert len(pw) == 1 and pw.check("alice", b"x")


def test_a_password_of_64_byte_salt_as_mosquitto_2_1_writes_it():
    salt = bytes(range(64))
    digest = hashlib.pbkdf2_hmac("sha512", b"pw", salt, 1000, 64)
    line = f"u:$7$1000${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"
    assert PasswordFile.parse([line]).check("u", b"pw")


# --- constant time and no user oracle -----------------------------------------------------


def test_every_check_compares_with_hmac_compare_digest_and_hashes_once(monkeypatch):
    """Read the code path, not the clock: each check goes through hmac.compare_digest, and an
    unknown user costs the same one PBKDF2 of the same iteration count as a known one."""
    compared, hashed = [], []
    real_compare, real_pbkdf2 = hmac.compare_digest, hashlib.pbkdf2_hmac

    def recording_compare(a, b):
        compared.append((len(a), len(b)))
        return real_compare(a, b)

    def recording_pbkdf2(name, password, salt, iterations, dklen=None):
        hashed.append((name, iterations, dklen))
        return real_pbkdf2(name, password, salt, iterations, dklen)

    pw = PasswordFile.parse([f"alice:{hash_password(b'right')}", f"bob:{hash_password(b'other')}"])
    monkeypatch.setattr(hmac, "compare_digest", recording_compare)
    monkeypatch.setattr(hashlib, "pbkdf2_hmac", recording_pbkdf2)
    for user, password, expected in [("alice", b"right", True), ("alice", b"wrong", False),
                                     ("nobody", b"right", False), ("nobody", None, False)]:
        compared.clear()
        hashed.clear()
        assert pw.check(user, password) is expected
        assert compared == [(64, 64)], (user, password)
        assert hashed == [("sha512", 101, 64)], (user, password)


def test_the_dummy_for_unknown_users_costs_what_most_entries_cost(monkeypatch):
    hashed = []
    real = hashlib.pbkdf2_hmac
    monkeypatch.setattr(hashlib, "pbkdf2_hmac", lambda n, p, s, i, d=None: hashed.append(i) or real(n, p, s, i, d))
    pw = PasswordFile.parse([f"a:{hash_password(b'x', iterations=50)}", f"b:{hash_password(b'x', iterations=50)}",
                             f"c:{hash_password(b'x')}"])
    hashed.clear()
    assert not pw.check("nobody", b"x")
    assert hashed == [50]


def test_an_empty_password_file_still_hashes_for_every_attempt(monkeypatch):
    hashed = []
    real = hashlib.pbkdf2_hmac
    monkeypatch.setattr(hashlib, "pbkdf2_hmac", lambda n, p, s, i, d=None: hashed.append(i) or real(n, p, s, i, d))
    pw = PasswordFile.parse(["# nobody yet"])
    assert len(pw) == 0 and not pw.check("", b"") and hashed == [101]


# --- broken password files ----------------------------------------------------------------

GOOD = hash_password(b"x")
_SALT, _HASH = GOOD.split("$")[3], GOOD.split("$")[4]


@pytest.mark.parametrize("line, problem", [
    ("alice", "expected USER:HASH, found no ':'"),
    (f":{GOOD}", "expected USER:HASH, found no user name before ':'"),
    ("alice:", "no password hash for user 'alice'"),
    ("alice:secret", "user 'alice': the password is not hashed (a plain-text file? `iotctl passwd -U FILE` hashes it)"),
    (f"alice:$5${_SALT}${_HASH}", "user 'alice': unknown hash type: expected $7$ (PBKDF2-SHA512) or $6$ (SHA512) as mosquitto_passwd writes"),
    (f"alice:$7$0${_SALT}${_HASH}", "user 'alice': the iteration count '0' is not a positive number"),
    (f"alice:$7$x${_SALT}${_HASH}", "user 'alice': the iteration count 'x' is not a positive number"),
    (f"alice:$7$101${_SALT}", "user 'alice': expected $7$ITERATIONS$SALT$HASH"),
    (f"alice:$6$101${_SALT}${_HASH}", "user 'alice': expected $6$SALT$HASH"),
    (f"alice:$7$101$!!!!${_HASH}", "user 'alice': the salt '!!!!' is not base64"),
    (f"alice:$7$101$AAAA${_HASH}", "user 'alice': the salt is 3 bytes, expected 12 (or 64)"),
    (f"alice:$7$101${_SALT}$AAAA", "user 'alice': the hash is 3 bytes, expected 64"),
])
def test_a_broken_line_names_the_file_the_line_and_what_was_expected(tmp_path, line, problem):
    f = tmp_path / "passwd"
    f.write_text(f"# header\nzed:{GOOD}\n{line}\n")
    with pytest.raises(AuthFileError) as e:
        PasswordFile.load(f)
    assert str(e.value) == f"{f}:3: {problem}"
    assert (e.value.path, e.value.line) == (str(f), 3)


def test_a_user_twice_is_refused_with_both_lines(tmp_path):
    f = tmp_path / "passwd"
    f.write_text(f"alice:{GOOD}\nbob:{GOOD}\nalice:{GOOD}\n")
    with pytest.raises(AuthFileError, match=re.escape(f"{f}:3: user 'alice' again (first on line 1)")):
        PasswordFile.load(f)


def test_a_missing_or_binary_file_is_an_auth_file_error(tmp_path):
    with pytest.raises(AuthFileError, match=re.escape(f"{tmp_path / 'nope'}: cannot read: No such file or directory")):
        PasswordFile.load(tmp_path / "nope")
    f = tmp_path / "bin"
    f.write_bytes(f"a:{GOOD}\n".encode() + b"\xff\xfe:x\n")
    with pytest.raises(AuthFileError, match=re.escape(f"{f}:2: not valid UTF-8")):
        PasswordFile.load(f)


# --- ACL: parsing -------------------------------------------------------------------------


def acl(text: str) -> Acl:
    return Acl.parse(text.split("\n"))


def test_every_line_kind_is_read_as_mosquitto_reads_it():
    a = acl("""# comment
topic read sensors/+/temp
topic anon/rw
topic deny anon/rw/secret
  topic   write   spaced  filter/x  \r
user alice smith
topic readwrite a/#
pattern read p/%c/#
user  bob
pattern write w/%u
""")
    rules = [(r.pattern, r.access, r.filter, r.user, r.line) for r in a.rules]
    assert rules == [
        (False, auth.READ, "sensors/+/temp", None, 2),
        (False, auth.READ | auth.WRITE, "anon/rw", None, 3),
        (False, auth.DENY, "anon/rw/secret", None, 4),
        (False, auth.WRITE, "spaced  filter/x", None, 5),
        (False, auth.READ | auth.WRITE, "a/#", "alice smith", 7),
        (True, auth.READ, "p/%c/#", "alice smith", 8),
        (True, auth.WRITE, "w/%u", "bob", 10),
    ]


def test_a_single_word_after_topic_is_the_filter_even_if_it_is_an_access_word():
    # Mosquitto's parser: with nothing after it, the second word is the topic (readwrite).
    a = acl("topic read\ntopic deny")
    assert [(r.access, r.filter) for r in a.rules] == [(3, "read"), (3, "deny")]


@pytest.mark.parametrize("line, problem", [
    ("topic", "expected 'topic [read|write|readwrite|deny] FILTER', found no filter"),
    ("pattern   ", "expected 'pattern [read|write|readwrite|deny] FILTER', found no filter"),
    ("topic sensors/+/temp  extra", "unknown access 'sensors/+/temp': expected read, write, readwrite or deny "
                                    "(a filter with spaces needs the access word before it)"),
    ("topic rw a/b", "unknown access 'rw': expected read, write, readwrite or deny "
                     "(a filter with spaces needs the access word before it)"),
    ("topic read a/#/b", "invalid filter 'a/#/b': '#' must be the whole last level in 'a/#/b' [MQTT-4.7.1-2]"),
    ("pattern write a+/%c", "invalid filter 'a+/%c': '+' must be a whole level in 'a+/%c' [MQTT-4.7.1-3]"),
    ("user", "expected 'user NAME', found no name"),
    ("user    ", "expected 'user NAME', found no name"),
    ("users alice", "expected 'topic', 'pattern', 'user' or a # comment, found 'users'"),
    ("topic\tread\ta", "expected 'topic', 'pattern', 'user' or a # comment, found 'topic\\tread\\ta' "
                       "(fields are separated by spaces, not tabs)"),
])
def test_a_broken_acl_line_names_the_file_the_line_and_what_was_expected(tmp_path, line, problem):
    f = tmp_path / "acl"
    f.write_text(f"# ok\ntopic read ok\n{line}\n")
    with pytest.raises(AuthFileError) as e:
        Acl.load(f)
    assert str(e.value) == f"{f}:3: {problem}"


def test_an_unreadable_acl_file_is_an_auth_file_error(tmp_path):
    with pytest.raises(AuthFileError, match="cannot read"):
        Acl.load(tmp_path / "none")


# --- ACL: decisions -----------------------------------------------------------------------

RULES = """\
# anonymous clients
topic read sensors/+/temp
topic write anon/out
topic readwrite shared/#
topic deny shared/secret
pattern read p/%c/#
pattern readwrite home/%u/#
pattern deny home/%u/locked
pattern write dev-%c/cmd
user alice
topic readwrite a/#
topic deny a/secret
topic read $SYS/broker/#
user bob
topic read b/+/r
topic write b/w/#
topic readwrite home/bob/locked
user alice
topic read more/alice
"""


@pytest.fixture(scope="module")
def rules() -> Acl:
    return acl(RULES)


@pytest.mark.parametrize("cid, user, topic, read, write", [
    # anonymous block: only clients without a user name
    ("c1", None, "sensors/x/temp", True, False),
    ("c1", None, "sensors/x/hum", False, False),
    ("c1", None, "anon/out", False, True),
    ("c1", None, "shared/x/y", True, True),
    ("c1", None, "shared", True, True),  # shared/# matches its parent level
    ("c1", None, "shared/secret", False, False),  # deny wins, wherever it stands
    ("c1", "carol", "sensors/x/temp", False, False),  # a user without a block gets no anonymous rules
    ("c1", "alice", "sensors/x/temp", False, False),
    # a user's block, merged from both "user alice" blocks
    ("c1", "alice", "a/b/c", True, True),
    ("c1", "alice", "a/secret", False, False),
    ("c1", "alice", "a/secret/x", True, True),  # the deny is for that topic only
    ("c1", "alice", "more/alice", True, False),
    ("c1", "bob", "b/x/r", True, False),
    ("c1", "bob", "b/w/1/2", False, True),
    # patterns apply to everyone; %c is the client id, %u the user name
    ("c1", None, "p/c1/x", True, False),
    ("c1", None, "p/c2/x", False, False),
    ("c1", "alice", "p/c1/x", True, False),
    ("c1", None, "dev-c1/cmd", False, True),  # %c inside a level, as Mosquitto substitutes
    ("c1", "alice", "home/alice/x", True, True),
    ("c1", "alice", "home/bob/x", False, False),
    ("c1", None, "home//x", False, False),  # %u never applies without a user name
    ("c1", "alice", "home/alice/locked", False, False),  # deny pattern over grant pattern
    ("c1", "bob", "home/bob/locked", True, True),  # own topic rule decides before patterns
    # $ topics: only a rule starting with $ matches them
    ("c1", None, "$SYS/broker/uptime", False, False),
    ("c1", "alice", "$SYS/broker/uptime", True, False),
])
def test_read_and_write_decisions(rules, cid, user, topic, read, write):
    assert rules.can_read(cid, user, topic) is read
    assert rules.can_write(cid, user, topic) is write


def test_a_name_with_plus_or_hash_gets_nothing_from_patterns_but_keeps_its_own_rules(rules):
    # CVE-2017-7650: "%c" = "+" would read everyone's p/+/#; Mosquitto refuses such clients
    # every pattern (even one without %c/%u), not only the substitution.
    for cid, user in [("+", None), ("#", None), ("a+b", None), ("c1", "ev#l"), ("c1", "+")]:
        assert not rules.can_read(cid, user, f"p/{cid}/x")
        assert not rules.can_read(cid, user, "p/anyone/x")
        assert not rules.can_write(cid, user, f"dev-{cid}/cmd")
        assert not rules.can_subscribe(cid, user, f"p/{cid}/#")
    assert rules.can_read("+", None, "sensors/x/temp")  # the anonymous block still applies
    assert rules.can_read("+", "alice", "a/x")


def test_a_slash_in_a_name_only_adds_levels_under_the_clients_own_prefix(rules):
    # Mosquitto allows "/" since 1.5: "p/%c/#" for "x/y" is "p/x/y/#", never wider.
    assert rules.can_read("x/y", None, "p/x/y/z")
    assert not rules.can_read("x/y", None, "p/x/z")
    assert not rules.can_read("x/y", None, "p/x")
    assert rules.can_read("x/y", "u/v", "home/u/v/w") and not rules.can_read("x/y", "u/v", "home/u/w")


def test_deny_beats_grant_whatever_the_order_in_the_file():
    a = acl("topic deny x/#\ntopic readwrite x/#\ntopic readwrite y/#\ntopic deny y/#\n"
            "pattern read z/%c\npattern deny z/%c\n")
    for topic in ("x/1", "y/1", "z/c"):
        assert not a.can_read("c", None, topic) and not a.can_write("c", None, topic), topic


def test_an_acl_without_rules_refuses_everything():
    a = acl("# nothing here yet\n\n")
    assert not a.can_read("c", None, "a") and not a.can_write("c", "u", "a") and not a.can_subscribe("c", None, "#")


def test_read_access_does_not_give_write_and_the_reverse():
    a = acl("topic read r\ntopic write w\n")
    assert a.can_read("c", None, "r") and not a.can_write("c", None, "r")
    assert a.can_write("c", None, "w") and not a.can_read("c", None, "w")


# --- ACL: subscriptions -------------------------------------------------------------------


def test_a_subscription_is_granted_where_a_read_rule_could_match_some_of_it():
    a = acl("topic read sensors/+/temp\n")
    assert a.can_subscribe("c", None, "sensors/+/temp")
    assert a.can_subscribe("c", None, "sensors/a/temp")
    assert a.can_subscribe("c", None, "sensors/#")  # only .../temp is delivered (can_read)
    assert a.can_subscribe("c", None, "sensors/+/+")
    assert a.can_subscribe("c", None, "#")
    assert not a.can_subscribe("c", None, "sensors/a/temp/x")
    assert not a.can_subscribe("c", None, "other/#")
    assert not a.can_subscribe("c", None, "$SYS/#")


@pytest.mark.parametrize("a, b, common", [
    ("a/b", "a/b", True), ("a/+", "a/b", True), ("a/#", "a", True), ("a/#", "a/b/c", True),
    ("+/+", "a/b/c", False), ("a/b", "a/c", False), ("a/+/c", "a/b/+", True), ("#", "$SYS/x", False),
    ("$SYS/#", "$SYS/+", True), ("+/#", "$SYS/x", False), ("a", "a/b", False), ("a/b", "#", True),
])
def test_overlaps(a, b, common):
    from daemons.broker.auth import overlaps
    assert overlaps(a, b) is common and overlaps(b, a) is common


@pytest.mark.parametrize("cid, user, topic_filter, granted", [
    ("c1", None, "shared/#", True),
    ("c1", None, "shared/+/x", True),
    ("c1", None, "shared/secret", False),  # all of it denied
    ("c1", None, "anon/out", False),  # write only
    ("c1", "alice", "a/#", True),  # overlaps the deny: granted, a/secret withheld at delivery
    ("c1", "alice", "a/+", True),
    ("c1", "alice", "a/secret", False),
    ("c1", "alice", "$SYS/broker/#", True),
    ("c1", "alice", "$SYS/#", True),  # overlaps $SYS/broker/#: only that part is delivered
    ("c1", "alice", "#", True),
    ("c1", None, "p/c1/#", True),
    ("c1", None, "p/c1/x/+", True),
    ("c1", None, "p/+/#", True),  # only p/c1/... is delivered
    ("c1", None, "p/c2/#", False),
    ("c1", "alice", "home/alice/#", True),
    ("c1", "alice", "home/alice/locked", False),
    ("c1", "bob", "home/bob/locked", True),
])
def test_subscriptions_under_the_shared_rules(rules, cid, user, topic_filter, granted):
    assert rules.can_subscribe(cid, user, topic_filter) is granted


# sub_acl_check's own vectors (plugins/dynamic-security/sub_matches_sub.c), (rule, sub, covered)
DYNSEC_VECTORS = [
    ("foo/+/bar", "foo/#", False), ("foo/+/ba℞/#", "foo/baz/ba℞", True),
    ("foo/+/ba℞/#", "foo/baz/ba℞/+", True), ("foo/+/ba℞/#", "foo/baz/ba℞/#", True),
    ("foo/+/ba℞/#", "foo/baz/+/#", False), ("/+//#", "/foo///#", True), ("#", "#", True),
    ("#", "+", True), ("/#", "+", False), ("/#", "/+", True), ("/+", "#", False), ("/+", "+", False),
    ("+/+", "topic/topic", True), ("+/+", "topic/topic/", False), ("+", "#", False), ("+", "+", True),
    ("a/b/c/d/e", "a/b/c/d/e", True), ("a/b/ /d/e", "a/b/c/d/e", False),
]


@pytest.mark.parametrize("rule, sub, covered", DYNSEC_VECTORS + [
    ("a/#", "a", True), ("a", "a/#", False), ("+/#", "#", True), ("/#", "#", False),
    ("x/+/#", "x/#", False), ("+/+/#", "#", False), ("+/#", "+/#", True), ("+", "a/#", False),
    ("#", "$SYS/x", False), ("$SYS/#", "$SYS/+", True), ("+/x", "$SYS/x", False), ("$SYS/x", "#", False),
])
def test_covers(rule, sub, covered):
    assert covers(rule, sub) is covered


# --- ACL: the per-client cache ------------------------------------------------------------


def test_the_expanded_rules_are_built_once_per_client_and_the_cache_is_bounded(rules, monkeypatch):
    assert rules.for_client("c1", "alice") is rules.for_client("c1", "alice")
    assert rules.for_client("c1", "alice") is not rules.for_client("c1", None)
    small = acl(RULES)
    monkeypatch.setattr(auth, "_CACHE_CLIENTS", 3)
    for n in range(10):
        assert small.can_read(f"n{n}", None, f"p/n{n}/x")
    assert len(small._clients) == 3
