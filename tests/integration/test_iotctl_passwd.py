"""`iotctl passwd`, the mosquitto_passwd work-alike, run as a process: what it writes, what it
refuses and its exit codes. The prompts are answered on a real pseudo-terminal. (That
Mosquitto accepts what it writes: tests/integration/test_auth_mosquitto.py.)"""

from __future__ import annotations

import os
import pty
import select
import stat
import subprocess
import time

import pytest

from daemons.broker.auth import PasswordFile, hash_password
from tests.support import BIN

IOTCTL = str(BIN / "iotctl")


def passwd(*args: str, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    return subprocess.run([IOTCTL, "passwd", *args], capture_output=True, text=True, timeout=60, stdin=stdin)


def on_terminal(args: list[str], answers: list[bytes], timeout: float = 30) -> tuple[int, bytes]:
    """Run `iotctl passwd ARGS` with a pseudo-terminal as its controlling terminal, typing
    each answer after a "...assword: " prompt. Returns (exit code, everything it showed)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: become iotctl at once
        try:
            os.execv(IOTCTL, [IOTCTL, "passwd", *args])
        finally:
            os._exit(127)
    shown, deadline = b"", time.monotonic() + timeout
    try:
        pending = list(answers)
        while True:
            if pending and shown.endswith(b"assword: "):
                os.write(fd, pending.pop(0) + b"\n")
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"iotctl passwd showed only {shown!r} within {timeout}s"
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child has exited and closed the terminal
                break
            if not chunk:
                break
            shown += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), shown


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_writes_one_hashed_user_in_a_0600_file(tmp_path):
    f = tmp_path / "passwd"
    r = passwd("-c", "-b", str(f), "alice", "s3cret")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert mode(f) == 0o600
    assert f.read_text().startswith("alice:$7$101$") and f.read_text().count("\n") == 1
    pw = PasswordFile.load(f)
    assert pw.check("alice", b"s3cret") and not pw.check("alice", b"s3cre")


def test_create_replaces_an_existing_file_and_keeps_its_mode(tmp_path):
    f = tmp_path / "passwd"
    f.write_text(f"old:{hash_password(b'x')}\n")
    f.chmod(0o640)
    assert passwd("-c", "-b", str(f), "new", "pw").returncode == 0
    pw = PasswordFile.load(f)
    assert "old" not in pw and pw.check("new", b"pw")
    assert mode(f) == 0o640


def test_add_and_change_users_keeping_comments_order_and_mode(tmp_path):
    f = tmp_path / "passwd"
    f.write_text(f"# site users\n\nalice:{hash_password(b'a1')}\n# the rest\nbob:{hash_password(b'b1')}\n")
    f.chmod(0o640)
    assert passwd("-b", str(f), "carol", "c1").returncode == 0
    assert passwd("-b", str(f), "alice", "a2").returncode == 0
    lines = f.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["# site users", "", "alice", "# the rest", "bob", "carol"]
    pw = PasswordFile.load(f)
    assert pw.check("alice", b"a2") and not pw.check("alice", b"a1")
    assert pw.check("bob", b"b1") and pw.check("carol", b"c1")
    assert mode(f) == 0o640


def test_sha512_and_iterations_as_mosquitto_passwd_H_and_I(tmp_path):
    f = tmp_path / "passwd"
    assert passwd("-c", "-H", "sha512", "-b", str(f), "old", "pw").returncode == 0
    assert passwd("-I", "1000", "-b", str(f), "slow", "pw").returncode == 0
    text = f.read_text()
    assert "old:$6$" in text and "slow:$7$1000$" in text
    pw = PasswordFile.load(f)
    assert pw.check("old", b"pw") and pw.check("slow", b"pw")


def test_delete_a_user_and_refuse_to_delete_one_that_is_not_there(tmp_path):
    f = tmp_path / "passwd"
    f.write_text(f"alice:{hash_password(b'a')}\nbob:{hash_password(b'b')}\n")
    assert passwd("-D", str(f), "alice").returncode == 0
    assert "alice" not in PasswordFile.load(f) and "bob" in PasswordFile.load(f)
    before = f.read_bytes()
    r = passwd("-D", str(f), "alice")
    assert r.returncode == 1 and f"user 'alice' is not in {f}; nothing changed" in r.stderr
    assert f.read_bytes() == before


def test_U_hashes_plain_passwords_and_keeps_what_is_hashed_already(tmp_path):
    f = tmp_path / "passwd"
    hashed = f"carol:{hash_password(b'c')}"
    f.write_text(f"# plain\nalice:apass\nbob: bpass : ignored\n\n{hashed}\n")
    r = passwd("-U", str(f))
    assert r.returncode == 0 and "1 entry was hashed already and kept as it was" in r.stderr
    lines = f.read_text().splitlines()
    assert lines[0] == "# plain" and lines[3] == "" and lines[4] == hashed
    pw = PasswordFile.load(f)
    assert pw.check("alice", b"apass") and pw.check("bob", b"bpass") and pw.check("carol", b"c")


def test_a_file_that_is_not_there_or_is_corrupt_fails_with_exit_1(tmp_path):
    r = passwd("-b", str(tmp_path / "none"), "alice", "pw")
    assert r.returncode == 1 and "does not exist (-c creates it)" in r.stderr
    f = tmp_path / "passwd"
    f.write_text(f"alice:{hash_password(b'a')}\ngarbage line\n")
    before = f.read_bytes()
    r = passwd("-b", str(f), "bob", "pw")
    assert r.returncode == 1 and f"{f}:2: expected USER:HASH, found no ':'; nothing changed" in r.stderr
    assert f.read_bytes() == before


@pytest.mark.parametrize("args, problem", [
    (["-b", "F", "al:ice", "pw"], "a user name may not contain ':'"),
    (["-b", "F", " alice", "pw"], "a user name may not be empty or begin or end with blanks"),
    (["-b", "F", "ali\x01ce", "pw"], "a user name may not contain control characters"),
    (["-c", "-D", "F", "alice"], "-c and -D cannot be used together"),
    (["-c", "-U", "F"], "-c and -U cannot be used together"),
    (["-b", "-D", "F", "alice"], "-b and -D cannot be used together"),
    (["-b", "F", "alice"], "-b needs PASSWORD after USER"),
    (["F", "alice", "pw"], "a PASSWORD on the command line needs -b"),
    (["-U", "F", "alice"], "-U takes only FILE"),
    (["F"], "USER is missing"),
    (["-I", "0", "-b", "F", "alice", "pw"], "-I: the number of iterations must be at least 1"),
])
def test_bad_usage_exits_64_and_says_what_is_wrong(tmp_path, args, problem):
    args = [str(tmp_path / "passwd") if a == "F" else a for a in args]
    r = passwd(*args)
    assert r.returncode == 64 and problem in r.stderr, r.stderr
    assert not (tmp_path / "passwd").exists()


def test_help_explains_and_exits_0():
    r = passwd("--help")
    assert r.returncode == 0 and "mosquitto_passwd" in r.stdout and "-U" in r.stdout and "exit codes" in r.stdout


def test_without_b_and_without_a_terminal_it_refuses_to_guess(tmp_path):
    f = tmp_path / "passwd"
    r = passwd("-c", str(f), "alice", stdin=subprocess.DEVNULL)
    assert r.returncode == 64 and "no terminal to ask the password on: give it with -b" in r.stderr
    assert not f.exists()


def test_the_password_is_asked_twice_without_echo(tmp_path):
    f = tmp_path / "passwd"
    code, shown = on_terminal(["-c", str(f), "alice"], [b"hunter2", b"hunter2"])
    assert code == 0, shown
    assert shown.count(b"assword: ") == 2 and b"Reenter password: " in shown
    assert b"hunter2" not in shown
    assert PasswordFile.load(f).check("alice", b"hunter2")


def test_passwords_that_differ_change_nothing(tmp_path):
    f = tmp_path / "passwd"
    f.write_text(f"alice:{hash_password(b'old')}\n")
    before = f.read_bytes()
    code, shown = on_terminal([str(f), "alice"], [b"new-one", b"new-two"])
    assert code == 1 and b"the passwords do not match; nothing changed" in shown
    assert f.read_bytes() == before


def test_through_a_symlink_the_file_it_points_to_is_changed(tmp_path):
    real = tmp_path / "real"
    real.write_text(f"alice:{hash_password(b'a')}\n")
    link = tmp_path / "link"
    link.symlink_to(real)
    assert passwd("-b", str(link), "bob", "b").returncode == 0
    assert link.is_symlink() and PasswordFile.load(real).check("bob", b"b")
