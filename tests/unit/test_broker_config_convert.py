"""`iotctl broker-config --from-mosquitto`: the converter as a function (daemons.broker.convert)
and the command in-process. Every Mosquitto option we map, include_dir (order, relative
paths, only in the main file), the reports with their file and line, comments and blank
lines, per_listener_settings, the listener a lost option would open wider, and the exit codes.
Each conversion's text is loaded back with tomllib and daemons.config.parse here too."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

from daemons import config as configmod
from daemons import ctl
from daemons.broker.convert import Conversion, body_limit, convert
from daemons.broker.mosquitto_conf import InputError, atoi, mosquitto_order


def conv(d: Path, text: str, cwd: Path | None = None, name: str = "mosquitto.conf") -> Conversion:
    f = d / name
    f.write_text(text)
    c = convert(f, cwd or d)
    configmod.parse(tomllib.loads(c.text), None)  # convert() checks it; so do we
    return c


def broker(c: Conversion) -> dict:
    return {k.name: k.value for k in c.broker}


def tables(c: Conversion) -> list[dict]:
    return [{k.name: k.value for k in t} for t in c.listeners]


def problems(c: Conversion) -> list[str]:
    return [str(r) for r in c.problems]


def notes(c: Conversion) -> list[str]:
    return [str(r) for r in c.notes]


@pytest.fixture(scope="module")
def pem(tmp_path_factory) -> tuple[Path, Path]:
    """A certificate and its key (the converter checks a TLS listener's files exist; our config
    loader does too)."""
    d = tmp_path_factory.mktemp("pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-keyout", "key.pem", "-out", "cert.pem"],
                   cwd=d, check=True, capture_output=True, timeout=60)
    return d / "cert.pem", d / "key.pem"


# --- reading: comments, values, include_dir --------------------------------------------------


def test_comments_blank_lines_and_line_numbers(tmp_path):
    c = conv(tmp_path, "# a comment\n\n   \n\t\n  # an indented comment\r\npid_file /run/x.pid\r\n# end\n")
    assert problems(c) == [f"{tmp_path}/mosquitto.conf:6: not converted: pid_file /run/x.pid: iot-broker writes no pid "
                           "file: systemd knows its pid (Type=notify)"]


def test_atoi_and_include_order_are_mosquittos():
    assert [atoi(s) for s in ("12", " 7x", "-3", "x", "", "+5")] == [12, 7, -3, 0, 0, 5]
    names = ["b.conf", "A.conf", "01.conf", "a.conf", "B.conf", "00.conf"]
    # mosquitto.conf(5): "00.conf 01.conf A.conf a.conf B.conf b.conf"
    assert sorted(names, key=mosquitto_order) == ["00.conf", "01.conf", "A.conf", "a.conf", "B.conf", "b.conf"]


def test_include_dir_reads_every_conf_file_in_mosquittos_order(tmp_path):
    d = tmp_path / "conf.d"
    d.mkdir()
    for i, name in enumerate(["b.conf", "A.conf", "01.conf", "a.conf", "B.conf", "00.conf"]):
        (d / name).write_text(f"listener {2000 + i}\n")
    (d / "README").write_text("listener 1\n")
    (d / "x.conf.bak").write_text("listener 2\n")
    (d / ".conf").write_text("listener 3\n")  # Mosquitto wants more than ".conf"
    c = conv(tmp_path, "listener 1883\ninclude_dir conf.d\nsys_interval 5\n")
    assert [Path(f).name for f in c.files] == ["mosquitto.conf", "00.conf", "01.conf", "A.conf", "a.conf", "B.conf",
                                               "b.conf"]
    assert [t["port"] for t in tables(c)] == [2005, 2002, 2001, 2003, 2004, 2000]
    assert broker(c)["sys_interval"] == 5.0  # the main file goes on after the include


def test_include_dir_is_relative_to_the_folder_mosquitto_runs_in(tmp_path):
    etc, run = tmp_path / "etc", tmp_path / "run"
    (run / "conf.d").mkdir(parents=True)
    etc.mkdir()
    (run / "conf.d" / "x.conf").write_text("password_file users\n")
    (etc / "mosquitto.conf").write_text("include_dir conf.d\n")
    c = convert(etc / "mosquitto.conf", run)
    assert broker(c)["password_file"] == str(run / "users")  # absolute: our TOML's own rule cannot move it
    with pytest.raises(InputError, match="include_dir conf.d: cannot read the folder"):
        convert(etc / "mosquitto.conf", etc)


def test_include_dir_in_an_included_file_is_ignored_as_mosquitto_does(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.conf").write_text("include_dir b\n")
    (tmp_path / "b" / "y.conf").write_text("listener 1\n")
    c = conv(tmp_path, "include_dir a\n")
    assert ("a/x.conf:1: note: include_dir b: Mosquitto reads include_dir in the main file only: this one is "
            "ignored") in notes(c)
    assert len(c.files) == 2 and not problems(c)


def test_missing_input_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="nothing.conf: cannot read"):
        convert(tmp_path / "nothing.conf", tmp_path)
    with pytest.raises(InputError, match="is a folder"):
        convert(tmp_path, tmp_path)


def test_listener_options_before_a_files_first_listener_line_are_the_default_listeners(tmp_path, pem):
    """Mosquitto's `cur_listener` starts at the default listener in every file it reads: the
    certfile at the top of the included file is not for the main file's last listener."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "tls.conf").write_text(f"port 8883\ncertfile {pem[0]}\nkeyfile {pem[1]}\n")
    c = conv(tmp_path, "listener 1883\nallow_anonymous true\ninclude_dir d\n")
    assert broker(c) == {"port": 1883, "allow_anonymous": True}
    assert tables(c) == [{"port": 8883, "certfile": str(pem[0]), "keyfile": str(pem[1])}]


# --- every mapped option -----------------------------------------------------------------------


def test_every_global_option_converted_and_nothing_reported(tmp_path):
    (tmp_path / "passwd").write_text("")
    (tmp_path / "acl").write_text("")
    c = conv(tmp_path, """\
listener 1884 10.0.0.1
password_file passwd
acl_file acl
allow_anonymous false
max_inflight_messages 40
max_queued_messages 1000
max_queued_bytes 1048576
max_packet_size 1000
max_connections 300
persistence true
persistence_location /var/lib/mosquitto/
persistent_client_expiration 14d
allow_zero_length_clientid false
sys_interval 30
autosave_interval 1800
""")
    assert broker(c) == {
        "host": "10.0.0.1", "port": 1884, "password_file": str(tmp_path / "passwd"), "acl_file": str(tmp_path / "acl"),
        "allow_anonymous": False, "max_inflight_messages": 40, "max_queued_messages": 1000,
        "max_queued_bytes": 1048576, "max_packet_size": 997, "max_connections": 300, "persistence": True,
        "persistence_location": "/var/lib/mosquitto", "persistent_client_expiration": "14d",
        "allow_zero_length_clientid": False, "sys_interval": 30.0}
    assert problems(c) == []
    assert notes(c) == [f"{tmp_path}/mosquitto.conf:15: note: autosave_interval 1800: not needed: iot-broker writes "
                        "each message to its store as it takes it (nothing is kept in memory only, to be saved later)"]
    assert "iot-broker keeps its own SQLite store (store.db) in this folder" in c.text
    assert f'max_packet_size = 997  # {tmp_path}/mosquitto.conf:8' in c.text
    loaded = configmod.parse(tomllib.loads(c.text), None).broker
    assert (loaded.host, loaded.port, loaded.max_packet_size, loaded.persistence_location) == (
        "10.0.0.1", 1884, 997, Path("/var/lib/mosquitto"))


def test_defaults_that_differ_are_emitted_only_when_the_file_sets_them(tmp_path):
    c = conv(tmp_path, "listener 1883\nallow_anonymous true\n")
    assert broker(c) == {"port": 1883, "allow_anonymous": True}  # no max_queued_messages 1000, no persistence false
    assert c.listeners == () and c.problems == () and c.notes == ()


@pytest.mark.parametrize(("line", "key", "value"), [
    ("max_inflight_messages 0", "max_inflight_messages", 65535),  # 0: no limit in Mosquitto
    ("max_inflight_messages -1", "max_inflight_messages", 65535),
    ("max_queued_messages 0", "max_queued_messages", 10_000_000),
    ("max_queued_bytes 0", "max_queued_bytes", 0),
    ("max_packet_size 131", "max_packet_size", 128),  # 1 + 2 + 128
    ("max_packet_size 268435460", "max_packet_size", 268435455),
    ("persistent_client_expiration 2m", "persistent_client_expiration", "2m"),
    ("persistent_client_expiration 1.5d", "persistent_client_expiration", "1d"),  # atoi, as Mosquitto
    ("persistence false", "persistence", False),
    ("persistence 1", "persistence", True),
    ("sys_interval 0", "sys_interval", 0.0),
    ("port 1885", "port", 1885),
    ("bind_address 127.0.0.2", "host", "127.0.0.2"),
])
def test_values_in_our_units(tmp_path, line, key, value):
    c = conv(tmp_path, f"allow_anonymous true\n{line}\n")
    assert broker(c)[key] == value
    assert problems(c) == []


def test_body_limit_is_the_largest_body_of_a_packet_that_size():
    assert [body_limit(n) for n in (20, 129, 130, 131, 16386)] == [18, 127, 127, 128, 16383]


@pytest.mark.parametrize(("line", "why"), [
    ("max_packet_size 40", "iot-broker takes packets of 64 bytes of body at the least: converted as "
                           "max_packet_size = 64"),
    ("max_packet_size 10", "less than 20: Mosquitto refuses the file"),
    ("max_inflight_messages 70000", "more than 65535: Mosquitto refuses the file"),
    ("max_queued_messages 20000000", "iot-broker takes at most 10000000: converted as max_queued_messages = 10000000"),
    ("sys_interval 70000", "not from 0 to 65535: Mosquitto refuses the file"),
    ("persistent_client_expiration 10", "not a duration such as 14d (h, d, w, m or y): Mosquitto refuses the file"),
    ("persistent_client_expiration 0d", "not a duration such as 14d (h, d, w, m or y): Mosquitto refuses the file"),
    ("persistence yes", "not true, false, 1 or 0: Mosquitto refuses the file"),
    ("port 70000", "not a port (1-65535): Mosquitto refuses the file"),
    ("log_dest syslog", "iot-broker logs to stderr / the journal ([log] level sets how much)"),
    ("log_type verbose", "not a log_type (none, information, notice, warning, error, debug, subscribe, "
                         "unsubscribe, websockets, all): Mosquitto refuses the file"),
    ("log_type", "no value: Mosquitto refuses the file"),
    ("connection bridge-1", "the bridge has no address: Mosquitto refuses the file; left out"),
    ("bridge_cafile /x", "a bridge option before any `connection` line: Mosquitto refuses the file"),
    ("round_robin true", "a bridge option iot-broker's bridges do not have"),
    ("auth_plugin /usr/lib/x.so", "plugins are not supported"),
    ("plugin /usr/lib/mosquitto_dynamic_security.so", "plugins are not supported"),
    ("plugin_opt_config_file /x", "plugins are not supported"),
    ("user mosquitto", "iot-broker does not switch users: its systemd unit runs it as the user iot"),
    ("max_keepalive 60", "an MQTT 5 setting not converted; [broker] max_keepalive and max_topic_alias are set by hand"),
    ("message_size_limit 100", "not supported: max_packet_size bounds whole packets"),
    ("no_such_option 1", "not a Mosquitto 2.0 option (Mosquitto refuses the file)"),
])
def test_not_converted_with_file_line_and_why(tmp_path, line, why):
    c = conv(tmp_path, f"allow_anonymous true\n\n{line}\n")
    assert problems(c) == [f"{tmp_path}/mosquitto.conf:3: not converted: {line}: {why}"]
    assert f"#   {tmp_path}/mosquitto.conf:3: not converted: {line}: {why}\n" in c.text  # the block at the top


@pytest.mark.parametrize(("lines", "value"), [
    (["debug"], ["debug"]),
    (["all"], ["all"]),
    (["none"], ["none"]),
    (["error", "warning", "debug", "debug trailing words"], ["error", "warning", "debug"]),  # first word, once
    (["debug", "none", "subscribe"], ["subscribe"]),  # none clears what came before
    (["debug", "none"], ["none"]),
    (["warning", "all", "debug"], ["all"]),  # all is every type already
    (["all", "none", "unsubscribe", "websockets"], ["unsubscribe", "websockets"]),
])
def test_log_type_lines_add_up_as_in_mosquitto(tmp_path, lines, value):
    c = conv(tmp_path, "listener 1883\nallow_anonymous true\n" + "".join(f"log_type {x}\n" for x in lines))
    assert broker(c)["log_type"] == value
    assert problems(c) == [] and notes(c) == []
    assert configmod.parse(tomllib.loads(c.text), None).broker.log_type == tuple(value)
    where = f"{tmp_path}/mosquitto.conf"
    assert f"log_type = {value!r}  # {where}:3".replace("'", '"') in c.text
    if len(lines) > 1:
        assert f"{where}:3, {where}:4" in c.text  # the comment above names every line


def test_log_type_notice_without_debug_is_noted(tmp_path):
    c = conv(tmp_path, "listener 1883\nallow_anonymous true\nlog_type error\nlog_type notice\n")
    assert broker(c)["log_type"] == ["error", "notice"]
    assert notes(c) == [f"{tmp_path}/mosquitto.conf:4: note: log_type notice: iot-broker logs Mosquitto's connection "
                        "lines (\"New client connected from ...\", \"Client ... disconnected.\") with the packet trace "
                        "only, log_type \"debug\"; its own lines follow [log] level"]
    assert notes(conv(tmp_path, "listener 1883\nallow_anonymous true\nlog_type notice\nlog_type debug\n")) == []


def test_a_second_path_is_refused_as_mosquitto_does(tmp_path):
    c = conv(tmp_path, "allow_anonymous true\npassword_file a\npassword_file b\n")
    assert broker(c)["password_file"] == str(tmp_path / "a")
    assert problems(c) == [f"{tmp_path}/mosquitto.conf:3: not converted: password_file b: a second password_file "
                           f"(the first is at {tmp_path}/mosquitto.conf:2): Mosquitto refuses the file"]


def test_a_path_value_is_the_rest_of_the_line(tmp_path):
    c = conv(tmp_path, 'allow_anonymous true\nacl_file  my "acl" file\\x  \n')
    assert broker(c)["acl_file"] == str(tmp_path / 'my "acl" file\\x')
    assert 'acl_file = "' + str(tmp_path).replace("\\", "\\\\") + '/my \\"acl\\" file\\\\x"' in c.text


# --- listeners ---------------------------------------------------------------------------------


def test_first_listener_is_the_default_and_the_others_are_tables(tmp_path, pem):
    c = conv(tmp_path, f"""\
listener 1883
listener 8883 127.0.0.1
certfile {pem[0]}
keyfile {pem[1]}
cafile {pem[0]}
require_certificate true
use_identity_as_username true
tls_version tlsv1.3
listener 9001
protocol websockets
allow_anonymous true
""")
    assert broker(c) == {"port": 1883, "allow_anonymous": True}  # global: per_listener_settings is false
    assert tables(c) == [
        {"port": 8883, "bind_address": "127.0.0.1", "certfile": str(pem[0]), "keyfile": str(pem[1]),
         "cafile": str(pem[0]), "require_certificate": True, "use_identity_as_username": True,
         "tls_version": "tlsv1.3"},
        {"port": 9001, "protocol": "websockets"}]
    assert problems(c) == [] and notes(c) == []
    loaded = configmod.parse(tomllib.loads(c.text), None).broker.listener
    assert [(lc.port, lc.tls, lc.protocol) for lc in loaded] == [(8883, True, "mqtt"), (9001, False, "websockets")]


def test_the_port_line_makes_the_default_listener_even_after_listeners(tmp_path):
    c = conv(tmp_path, "listener 9001\nprotocol websockets\nport 1884\nallow_anonymous true\n")
    assert broker(c)["port"] == 1884
    assert tables(c) == [{"port": 9001, "protocol": "websockets"}]


def test_no_plain_listener_gives_ours_on_loopback(tmp_path, pem):
    c = conv(tmp_path, f"listener 1883\ncertfile {pem[0]}\nkeyfile {pem[1]}\nallow_anonymous true\n")
    assert broker(c) == {"host": "127.0.0.1", "port": 1884, "allow_anonymous": True}  # 1883 is the TLS one's
    assert tables(c)[0]["port"] == 1883
    assert notes(c) == ["note: iot-broker always has a plain MQTT listener ([broker] host/port) and the Mosquitto file "
                        "has none: it is set to 127.0.0.1:1884, this machine only"]
    assert problems(c) == []


def test_no_listener_at_all_is_local_only_with_anonymous_clients(tmp_path):
    c = conv(tmp_path, "password_file p\nallow_anonymous false\n")
    assert broker(c) == {"host": "127.0.0.1", "password_file": str(tmp_path / "p"), "allow_anonymous": True}
    assert f"{tmp_path}/mosquitto.conf:2: note: allow_anonymous false: Mosquitto ignores it without `listener` and " \
           "`port` lines: anonymous clients are let in" in notes(c)
    assert "note: no `listener` and no `port` line: Mosquitto runs local only (127.0.0.1:1883, anonymous clients " \
           "let in); converted as such" in notes(c)


def test_listener_options_without_a_listener_line_open_every_interface_as_in_mosquitto(tmp_path):
    """Mosquitto 2.0.11 with just `max_connections 10` listens on 0.0.0.0:1883 and lets anyone in."""
    c = conv(tmp_path, "max_connections 10\n")
    assert broker(c) == {"max_connections": 10, "allow_anonymous": True}
    assert any("Mosquitto opens its default listener on 1883 of every interface" in n for n in notes(c))


def test_a_listener_that_would_open_wider_is_left_out_whole(tmp_path, pem):
    c = conv(tmp_path, f"""\
allow_anonymous true
listener 1883
listener 8883
certfile {pem[0]}
keyfile {pem[1]}
cafile {pem[0]}
crlfile /etc/revoked.pem
listener 1884
mount_point tenant/
listener 0 /run/mosquitto.sock
listener 8884
certfile /nowhere/cert.pem
keyfile {pem[1]}
""")
    assert tables(c) == []
    f = f"{tmp_path}/mosquitto.conf"
    left = "the listener at {} is left out: without this it would let in clients Mosquitto refuses or listen where " \
           "Mosquitto does not"
    assert problems(c) == [
        f"{f}:3: not converted: listener 8883: part of the listener at {f}:3, which is left out ({f}:7)",
        f"{f}:4: not converted: certfile {pem[0]}: part of the listener at {f}:3, which is left out ({f}:7)",
        f"{f}:5: not converted: keyfile {pem[1]}: part of the listener at {f}:3, which is left out ({f}:7)",
        f"{f}:6: not converted: cafile {pem[0]}: part of the listener at {f}:3, which is left out ({f}:7)",
        f"{f}:7: not converted: crlfile /etc/revoked.pem: certificate revocation lists are not supported; "
        + left.format(f"{f}:3"),
        f"{f}:8: not converted: listener 1884: part of the listener at {f}:8, which is left out ({f}:9)",
        f"{f}:9: not converted: mount_point tenant/: mount points are not supported; " + left.format(f"{f}:8"),
        f"{f}:10: not converted: listener 0 /run/mosquitto.sock: unix sockets are not supported; "
        + left.format(f"{f}:10"),
        f"{f}:11: not converted: listener 8884: part of the listener at {f}:11, which is left out ({f}:12)",
        f"{f}:12: not converted: certfile /nowhere/cert.pem: no such file here: /nowhere/cert.pem (iot-broker checks "
        f"a listener's files at start: convert on the machine that has them); " + left.format(f"{f}:11"),
        f"{f}:13: not converted: keyfile {pem[1]}: part of the listener at {f}:11, which is left out ({f}:12)"]


def test_tls_settings_checked_as_mosquitto_and_our_loader_do(tmp_path, pem):
    c = conv(tmp_path, f"""\
allow_anonymous true
listener 1883
cafile {pem[0]}
listener 8883
certfile {pem[0]}
keyfile {pem[1]}
tls_version tlsv1.1
listener 8884
certfile {pem[0]}
keyfile {pem[1]}
require_certificate true
listener 8885
certfile {pem[0]}
""")
    f = f"{tmp_path}/mosquitto.conf"
    assert tables(c) == [{"port": 8883, "certfile": str(pem[0]), "keyfile": str(pem[1])}]
    assert problems(c)[:2] == [
        f"{f}:3: not converted: cafile {pem[0]}: a TLS setting on a listener without certfile and keyfile: it has "
        "no effect there",
        f"{f}:7: not converted: tls_version tlsv1.1: iot-broker accepts TLS 1.2 at the lowest: clients limited to "
        "TLS 1.1 are refused"]
    by_line = {p.split(": not converted")[0]: p for p in problems(c)}
    assert by_line[f"{f}:11"].startswith(f"{f}:11: not converted: require_certificate true: require_certificate needs "
                                         "cafile (capath is not supported); the listener at")
    assert by_line[f"{f}:13"].startswith(f"{f}:13: not converted: certfile {pem[0]}: TLS needs both certfile and "
                                         "keyfile: Mosquitto refuses one alone; the listener at")
    assert by_line[f"{f}:8"].endswith(f"part of the listener at {f}:8, which is left out ({f}:11)")


# --- access ------------------------------------------------------------------------------------


def test_no_password_file_and_no_anonymous_refuses_everyone_in_mosquitto(tmp_path):
    """Mosquitto 2.0 with listeners, no password_file and allow_anonymous false refuses every
    client; ours would let local clients in on the default listener (reported), and its tables
    get allow_anonymous = false, which refuses everyone there too."""
    c = conv(tmp_path, "listener 1883\nlistener 1884 0.0.0.0\n")
    assert broker(c) == {"port": 1883}
    assert tables(c) == [{"port": 1884, "bind_address": "0.0.0.0", "allow_anonymous": False}]
    assert problems(c) == [f"{tmp_path}/mosquitto.conf:1: not converted: listener 1883: with no password_file and "
                           "allow_anonymous false Mosquitto refuses every client on this listener; iot-broker cannot: "
                           "it listens on 127.0.0.1 only and lets local clients in (set a password_file or "
                           "allow_anonymous)"]


def test_per_listener_settings(tmp_path):
    f = tmp_path / "mosquitto.conf"
    c = conv(tmp_path, """\
per_listener_settings true
listener 1883
password_file users
acl_file acl
allow_anonymous true
listener 1884
password_file users
acl_file acl
listener 1885
password_file other
allow_zero_length_clientid false
""")
    assert broker(c) == {"port": 1883, "password_file": str(tmp_path / "users"), "acl_file": str(tmp_path / "acl"),
                         "allow_anonymous": True}
    # Each listener's own allow_anonymous (Mosquitto's is false where not set).
    assert tables(c) == [{"port": 1884, "allow_anonymous": False}, {"port": 1885, "allow_anonymous": False}]
    assert problems(c) == [
        f"{f}:1: not converted: per_listener_settings true: iot-broker keeps one set of rules for all listeners (a "
        "listener may override allow_anonymous); the listeners' files are converted where they agree",
        f"{f}:9: not converted: listener 1885: per_listener_settings true: the listener at {f}:9 has acl_file none, "
        f"the listener at {f}:2 {tmp_path}/acl; iot-broker keeps one acl_file for all listeners: {tmp_path}/acl",
        f"{f}:10: not converted: password_file other: per_listener_settings true: the listener at {f}:9 has "
        f"password_file {tmp_path}/other, the listener at {f}:2 {tmp_path}/users; iot-broker keeps one password_file "
        f"for all listeners: {tmp_path}/users",
        f"{f}:11: not converted: allow_zero_length_clientid false: per_listener_settings true: the listener at {f}:9 "
        f"has allow_zero_length_clientid false, the listener at {f}:2 true; iot-broker keeps one "
        "allow_zero_length_clientid for all listeners: true"]

def test_per_listener_settings_after_a_security_setting_is_refused_by_mosquitto(tmp_path):
    c = conv(tmp_path, "allow_anonymous true\nper_listener_settings true\n")
    assert problems(c) == [f"{tmp_path}/mosquitto.conf:2: not converted: per_listener_settings true: Mosquitto refuses "
                           "the file: per_listener_settings must come before any security setting"]


def test_without_per_listener_settings_allow_anonymous_after_a_listener_is_global(tmp_path):
    (tmp_path / "p").write_text("")
    c = conv(tmp_path, "listener 1883\nlistener 1884\nallow_anonymous true\npassword_file p\n")
    assert broker(c)["allow_anonymous"] is True
    assert tables(c) == [{"port": 1884}]  # no override: the broker's applies, as in Mosquitto


def test_max_connections_is_one_for_the_broker(tmp_path):
    c = conv(tmp_path, "allow_anonymous true\nlistener 1883\nmax_connections 100\nlistener 1884\nmax_connections 50\n"
                       "listener 1885\nmax_connections -1\n")
    f = f"{tmp_path}/mosquitto.conf"
    assert broker(c)["max_connections"] == 100
    assert problems(c) == [f"{f}:5: not converted: max_connections 50: max_connections is per listener in Mosquitto and "
                           f"one for the whole broker in iot-broker: 100 (from {f}:3) applies"]
    assert any(n.startswith(f"{f}:7: note: max_connections -1: no limit in Mosquitto") for n in notes(c))


# --- iotctl broker-config -----------------------------------------------------------------------


def test_command_exit_codes_stdout_stderr_and_output_file(tmp_path, capsys):
    good = tmp_path / "good.conf"
    good.write_text("listener 1883\nallow_anonymous true\n")
    bad = tmp_path / "bad.conf"
    bad.write_text("listener 1883\nallow_anonymous true\nlog_dest syslog\n")
    assert ctl.main(["broker-config", "--from-mosquitto", str(good)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"# iot-broker's [broker] section, converted from the Mosquitto configuration {good}\n")
    assert "port = 1883" in out and err == ""
    assert ctl.main(["broker-config", "--from-mosquitto", str(bad)]) == 1
    out, err = capsys.readouterr()
    assert err == (f"{bad}:3: not converted: log_dest syslog: iot-broker logs to stderr / the journal ([log] level "
                   "sets how much)\n")
    assert tomllib.loads(out)["broker"] == {"port": 1883, "allow_anonymous": True}

    target = tmp_path / "broker.toml"
    assert ctl.main(["broker-config", "--from-mosquitto", str(bad), "-o", str(target)]) == 1
    assert capsys.readouterr().out == ""
    first = target.read_text()
    assert "log_dest syslog" in first
    assert ctl.main(["broker-config", "--from-mosquitto", str(good), "-o", str(target)]) == 73  # exists
    assert "exists: not replaced (--force replaces it)" in capsys.readouterr().err
    assert target.read_text() == first
    assert ctl.main(["broker-config", "--from-mosquitto", str(good), "-o", str(target), "--force"]) == 0
    assert "log_dest" not in target.read_text()
    assert not list(tmp_path.glob(".*.tmp"))

    assert ctl.main(["broker-config", "--from-mosquitto", str(tmp_path / "none.conf")]) == 66
    assert "none.conf: cannot read: No such file or directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        ctl.main(["broker-config"])
    assert e.value.code == 64
    assert ctl.main(["broker-config", "--from-mosquitto", str(good), "--cwd", str(tmp_path / "nowhere")]) == 64
    assert ctl.main(["broker-config", "--from-mosquitto", str(good), "--force"]) == 64


def test_per_listener_options_before_the_first_listener_are_the_default_listeners(tmp_path):
    """With per_listener_settings true, a password_file before any `listener` line is the
    default listener's and makes Mosquitto open it (on 1883); an allow_anonymous there does
    not, and Mosquitto ignores it when nothing else opens it."""
    (tmp_path / "p").write_text("")
    c = conv(tmp_path, "per_listener_settings true\npassword_file p\nlistener 1884\npassword_file p\n")
    assert broker(c) == {"password_file": str(tmp_path / "p")}  # our default listener, on 1883
    assert tables(c) == [{"port": 1884}]
    c = conv(tmp_path, "per_listener_settings true\nallow_anonymous true\nlistener 1884\nallow_anonymous true\n")
    assert broker(c) == {"port": 1884, "allow_anonymous": True}
    assert notes(c) == [f"{tmp_path}/mosquitto.conf:2: note: allow_anonymous true: Mosquitto ignores it: it sets the "
                        "default listener (it stands before the file's first `listener` line), which Mosquitto does "
                        "not open here"]


def test_lines_mosquitto_ignores_or_refuses_on_an_unopened_default_listener(tmp_path):
    c = conv(tmp_path, "protocol\nallow_anonymous true\ninclude_dir\n")
    f = f"{tmp_path}/mosquitto.conf"
    assert problems(c) == [f"{f}:1: not converted: protocol: protocol '': iot-broker speaks mqtt and websockets",
                           f"{f}:3: not converted: include_dir: no value: Mosquitto refuses the file"]
    assert c.files == (f,)


def test_a_bad_boolean_on_a_listener_is_reported_not_a_crash(tmp_path):
    c = conv(tmp_path, "per_listener_settings true\nlistener 1883\nallow_zero_length_clientid maybe\n"
                       "allow_anonymous true\n")
    assert problems(c)[1] == (f"{tmp_path}/mosquitto.conf:3: not converted: allow_zero_length_clientid maybe: not "
                              "true, false, 1 or 0: Mosquitto refuses the file")


def test_a_bridge_section_becomes_a_bridge_table(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("not read by the conversion, only checked to exist\n")
    c = conv(tmp_path, "listener 1883\nallow_anonymous true\n"
                       "connection upstream\naddress cloud.example:8883 backup.example\nremote_clientid edge-7\n"
                       "remote_username edge\nremote_password s3cret\nbridge_cafile ca.crt\ncleansession true\n"
                       "keepalive_interval 30\ntry_private false\nrestart_timeout 5 60\n"
                       "topic sensors/# out 1 \"\" site/7/\ntopic cmd/# in 2 site/7/ \"\"\ntopic \"\" both 0 a/b c/d\n",
             cwd=tmp_path)
    assert problems(c) == []
    assert "iot-broker waits a constant restart_timeout: 5 s" in "\n".join(str(n) for n in c.notes)
    b = configmod.parse(tomllib.loads(c.text), None).broker.bridge[0]
    assert (b.name, b.address, b.remote_clientid, b.remote_username, b.remote_password) == (
        "upstream", ("cloud.example:8883", "backup.example:1883"), "edge-7", "edge", "s3cret")
    assert (b.bridge_cafile, b.cleansession, b.keepalive_interval, b.try_private, b.restart_timeout) == (
        ca, True, 30, False, 5.0)
    assert [(t.local, t.remote, t.direction, t.qos) for t in b.topics] == [
        ("sensors/#", "site/7/sensors/#", "out", 1), ("site/7/cmd/#", "cmd/#", "in", 2), ("a/b", "c/d", "both", 0)]


def test_a_bridge_topic_iot_broker_refuses_leaves_the_bridge_out_with_the_reason(tmp_path):
    c = conv(tmp_path, "listener 1883\nallow_anonymous true\nconnection up\naddress h\ntopic a/# sideways 1\n")
    assert problems(c) == [f"{tmp_path}/mosquitto.conf:5: not converted: topic a/# sideways 1: expected a direction "
                           "out, in or both, got 'sideways' in 'a/# sideways 1'; the bridge is left out"]
    assert "[[broker.bridge]]" not in c.text
