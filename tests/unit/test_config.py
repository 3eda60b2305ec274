import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from daemons import config
from tests.support import ROOT

SHIPPED = ROOT / "etc" / "iot" / "iot.toml"


def load_text(tmp_path: Path, text: str) -> config.Config:
    p = tmp_path / "iot.toml"
    p.write_text(text)
    return config.load(p)


def test_shipped_file_loads_and_points_state_at_the_checkout():
    cfg = config.load(SHIPPED)
    assert cfg.paths.state_dir.resolve() == (ROOT / "var").resolve()
    assert cfg.broker == config.BrokerConfig(acl_file=ROOT / "etc" / "iot" / "acl")  # the factory's rules
    assert cfg.mqtt == config.MqttConfig()


def test_shipped_file_documents_every_key_with_its_default():
    """Each key of each section appears in the shipped file (commented or set) with the
    built-in default, so the file is the reference a user reads."""
    section = None
    seen: dict[tuple[str, str], str] = {}
    for line in SHIPPED.read_text().splitlines():
        if m := re.match(r"^\[(\w+)\]", line):
            section = m.group(1)
        elif m := re.match(r"^# \[\[(\w+)\.([\w.]+)\]\]$", line):
            # An array of tables, documented by a commented example: its keys follow.
            outer, _, key = f"{m.group(1)}.{m.group(2)}".rpartition(".")
            seen[(outer, key)] = "[]"
            section = f"{m.group(1)}.{m.group(2)}"
        elif m := re.match(r"^#? ?(\w+) = (.+)$", line):
            seen[(section, m.group(1))] = m.group(2)
    tables = {"tuple[ListenerConfig, ...]", "tuple[PlcDeviceConfig, ...]", "tuple[RegisterConfig, ...]",
              "tuple[FactoryDeviceConfig, ...]", "tuple[SensorConfig, ...]", "tuple[RuleConfig, ...]"}
    for name, cls in config.SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert (name, f.name) in seen, f"[{name}] {f.name} is not documented in {SHIPPED}"
            if name == "paths" or (name, f.name) == ("broker", "acl_file") or str(f.type) in tables:
                continue  # the checkout's file deliberately sets state_dir and acl_file; tables: below
            value = tomllib.loads(f"k = {seen[(name, f.name)]}")["k"]
            documented = getattr(config.parse({name: {f.name: value}}, SHIPPED), name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert getattr(documented, f.name) == default, f"[{name}] {f.name} documents a wrong default"
    minimal = {"broker.listener": {"port": 8883},
               "broker.bridge": {"name": "b", "address": ["h:1883"], "topic": ["a/# out 1"]}, "plc.device": {"name": "line1"},
               "plc.device.register": {"name": "t", "address": 0},
               "factory.device": {"name": "m", "sensor": [{"name": "t"}]}, "factory.device.sensor": {"name": "t"},
               "factory.rule": {}}

    def parse_table(label: str, table: dict):
        if label == "broker.listener":
            return config.parse({"broker": {"listener": [table]}}, SHIPPED).broker.listener[0]
        if label == "broker.bridge":
            return config.parse({"broker": {"bridge": [table]}}, SHIPPED).broker.bridge[0]
        if label == "plc.device":
            return config.parse({"plc": {"device": [table]}}, SHIPPED).plc.device[0]
        if label == "factory.device":
            return config.parse({"factory": {"device": [table]}}, SHIPPED).factory.device[0]
        if label == "factory.device.sensor":
            return config.parse({"factory": {"device": [{"name": "m", "sensor": [table]}]}},
                                SHIPPED).factory.device[0].sensor[0]
        if label == "factory.rule":
            return config.parse({"factory": {"rule": [table]}}, SHIPPED).factory.rule[0]
        dev = {"name": "p", "source": "modbus", "host": "h", "register": [table]}
        return config.parse({"plc": {"device": [dev]}}, SHIPPED).plc.device[0].register[0]

    for label, cls in (("broker.listener", config.ListenerConfig), ("broker.bridge", config.BridgeConfig),
                       ("plc.device", config.PlcDeviceConfig),
                       ("plc.device.register", config.RegisterConfig), ("factory.device", config.FactoryDeviceConfig),
                       ("factory.device.sensor", config.SensorConfig), ("factory.rule", config.RuleConfig)):
        for f in dataclasses.fields(cls):
            assert (label, f.name) in seen, f"[[{label}]] {f.name} is not documented in {SHIPPED}"
            if f.default in (dataclasses.MISSING, None) or str(f.type) in tables or label == "broker.bridge" and \
                    f.name == "topic":
                continue  # required keys; an unset allow_anonymous has no TOML spelling; nested tables
            value = tomllib.loads(f"k = {seen[(label, f.name)]}")["k"]
            documented = parse_table(label, {**minimal[label], f.name: value})
            assert getattr(documented, f.name) == f.default, f"[[{label}]] {f.name} documents a wrong default"
    assert config.PlcConfig().device == (config.PlcDeviceConfig(name=tomllib.loads(
        f"k = {seen[('plc.device', 'name')]}")["k"]),), "the default PLC is not the one the file names"


def test_defaults_apply_when_no_file_is_found(monkeypatch, tmp_path):
    monkeypatch.delenv("IOT_CONFIG", raising=False)
    monkeypatch.setattr(config, "CHECKOUT_CONFIG", tmp_path / "none.toml")
    monkeypatch.setattr(config, "SYSTEM_CONFIG", tmp_path / "none2.toml")
    cfg = config.load(None)
    assert cfg.source is None and cfg.broker.port == 1883


def test_lookup_order_prefers_explicit_then_env(monkeypatch, tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text("[broker]\nport = 1001\n")
    b.write_text("[broker]\nport = 1002\n")
    monkeypatch.setenv("IOT_CONFIG", str(b))
    assert config.load(a).broker.port == 1001
    assert config.load(None).broker.port == 1002


def test_relative_paths_resolve_against_the_files_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "iot.toml"
    p.write_text('[paths]\nstate_dir = "../state"\n[mqtt]\ncafile = "ca.pem"\n')
    cfg = config.load(p)
    assert cfg.paths.state_dir.resolve() == (tmp_path / "state").resolve()
    assert cfg.mqtt.cafile == tmp_path / "sub" / "ca.pem"


@pytest.mark.parametrize(
    "text, key, expected",
    [
        ("[broker]\nprot = 1\n", "[broker] prot", "unknown key"),
        ("[brokr]\nport = 1\n", "[brokr]", "unknown section"),
        ("[broker]\nport = 70000\n", "[broker] port", "expected an integer from 1 to 65535, got 70000"),
        ("[broker]\nport = \"1883\"\n", "[broker] port", "expected an integer"),
        ("[broker]\nport = true\n", "[broker] port", "expected an integer"),
        ("[broker]\nallow_zero_length_clientid = 1\n", "[broker] allow_zero_length_clientid", "expected true or false"),
        ("[mqtt]\nhost = 5\n", "[mqtt] host", "expected a string"),
        ("[mqtt]\nkeepalive = 1\n", "[mqtt] keepalive", "from 5 to 65535"),
        ('[mqtt]\nprotocol = "3.1"\n', "[mqtt] protocol", "3.1.1"),
        ("[mqtt]\nprotocol = 5\n", "[mqtt] protocol", "expected a string"),
        ("[broker]\nconnect_timeout = -1.5\n", "[broker] connect_timeout", "expected a number"),
        ("[broker]\nconnect_timeout = nan\n", "[broker] connect_timeout", "from 0.1 to 3600, got nan"),
        ("[factory]\n[[factory.device]]\nname = \"m\"\n[[factory.device.sensor]]\nname = \"t\"\nhysteresis = nan\n",
         "[[factory.device]] #1 sensor #1 hysteresis", "expected a number, got nan"),
        ('[broker]\npersistent_client_expiration = "30 days"\n', "[broker] persistent_client_expiration",
         "expected a whole number and a unit s, h, d, w, m or y"),
        ('[broker]\npersistent_client_expiration = "30x"\n', "[broker] persistent_client_expiration", "'30x'"),
        ("[broker]\npersistent_client_expiration = 30\n", "[broker] persistent_client_expiration",
         "expected a string"),
        ("[broker]\nmax_topic_levels = 0\n", "[broker] max_topic_levels", "from 1 to 65535"),
        ("[broker]\nmax_connect_size = 10\n", "[broker] max_connect_size", "from 64 to 268435455"),
        ("[broker]\nmax_connection_rate = -1\n", "[broker] max_connection_rate", "expected an integer"),
        ("[broker]\nwrite_timeout = 0\n", "[broker] write_timeout", "expected a number"),
        ('[broker]\nlog_type = ["debug", "verbose"]\n', "[broker] log_type",
         "expected a list of strings from debug, subscribe, unsubscribe, error, warning, notice, information, "
         "websockets, none, all, got ['debug', 'verbose']"),
        ('[broker]\nlog_type = "debug"\n', "[broker] log_type", "expected a list of strings from debug"),
    ],
)
def test_bad_values_name_file_key_and_expectation(tmp_path, text, key, expected):
    with pytest.raises(config.ConfigError) as e:
        load_text(tmp_path, text)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(str(tmp_path / "iot.toml"))
    assert key in msg and expected in msg


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(config.ConfigError, match="invalid TOML"):
        load_text(tmp_path, "[broker\n")
    with pytest.raises(config.ConfigError, match="no such file"):
        config.load(tmp_path / "absent.toml")


@pytest.mark.parametrize("text", ["[broker]\nprot = 1883\n", "[mqtt]\nport = 0\n"])
def test_daemon_with_bad_config_prints_one_line_and_exits_78(tmp_path, text):
    cfg = tmp_path / "iot.toml"
    cfg.write_text(text)
    r = subprocess.run([sys.executable, str(ROOT / "tests/integration/sample_daemon.py"), "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 78
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(cfg) in lines[0] and ("prot" in lines[0] or "port" in lines[0])


def test_missing_named_config_exits_78(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tests/integration/sample_daemon.py"), "--config",
                        str(tmp_path / "nope.toml")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 78 and "nope.toml" in r.stderr and "no such file" in r.stderr


@pytest.mark.parametrize("text, seconds", [
    ("", 0), ("0", 0), ("90s", 90), ("12h", 12 * 3600), ("30d", 30 * 86400), ("2w", 14 * 86400), ("1m", 30 * 86400),
    ("1y", 365 * 86400),
])
def test_persistent_client_expiration_takes_mosquittos_format(tmp_path, text, seconds):
    cfg = load_text(tmp_path, f'[broker]\npersistent_client_expiration = "{text}"\n')
    assert cfg.broker.persistent_client_expiration == text
    assert config.expiration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["d", "30", "-1d", "1.5d", "0d", "30D", "30dd", " 30d", "\u0663d"])
def test_persistent_client_expiration_refuses_anything_else(text):
    with pytest.raises(ValueError, match="whole number and a unit"):
        config.expiration_seconds(text)


def test_max_inflight_per_client_takes_a_table_of_patterns():
    cfg = config.parse({"broker": {"max_inflight_per_client": {"meter-*": 200}}}, None)
    assert cfg.broker.max_inflight_per_client == {"meter-*": 200}
    with pytest.raises(config.ConfigError, match=r"\[broker\] max_inflight_per_client: expected a table"):
        config.parse({"broker": {"max_inflight_per_client": {"meter-*": 0}}}, None)
    with pytest.raises(config.ConfigError, match="expected a table"):
        config.parse({"broker": {"max_inflight_per_client": 5}}, None)


def _tls_files(tmp_path: Path) -> None:
    for name in ("server.crt", "server.key", "ca.crt"):
        (tmp_path / name).write_text("PEM\n")  # only their existence is checked when loading


def test_listener_tables_take_mosquittos_keys_with_paths_relative_to_the_file(tmp_path):
    _tls_files(tmp_path)
    cfg = load_text(tmp_path, '[broker]\n'
                    '[[broker.listener]]\nport = 8883\ncertfile = "server.crt"\nkeyfile = "server.key"\n'
                    'cafile = "ca.crt"\nrequire_certificate = true\nuse_identity_as_username = true\n'
                    'tls_version = "tlsv1.3"\nallow_anonymous = false\n'
                    '[[broker.listener]]\nport = 8080\nbind_address = "127.0.0.1"\nprotocol = "websockets"\n')
    tls, ws = cfg.broker.listener
    assert (tls.port, tls.bind_address, tls.protocol, tls.tls) == (8883, "", "mqtt", True)
    assert (tls.certfile, tls.keyfile, tls.cafile) == (tmp_path / "server.crt", tmp_path / "server.key",
                                                        tmp_path / "ca.crt")
    assert tls.require_certificate and tls.use_identity_as_username and tls.tls_version == "tlsv1.3"
    assert tls.allow_anonymous is False
    assert (ws.port, ws.bind_address, ws.protocol, ws.tls, ws.allow_anonymous) == (8080, "127.0.0.1", "websockets",
                                                                                   False, None)
    assert cfg.broker.port == 1883  # the default listener stays


@pytest.mark.parametrize("tables, key, expected", [
    ('[[broker.listener]]\nprot = 1\n', "[[broker.listener]] #1 prot", "unknown key"),
    ('[[broker.listener]]\nport = 1\n[[broker.listener]]\nbind_address = "::1"\n', "[[broker.listener]] #2 port",
     "missing"),
    ('[[broker.listener]]\nport = 0\n', "[[broker.listener]] #1 port", "expected an integer from 1 to 65535"),
    ('[[broker.listener]]\nport = "8883"\n', "[[broker.listener]] #1 port", "expected an integer"),
    ('[[broker.listener]]\nport = 1\nprotocol = "ws"\n', "[[broker.listener]] #1 protocol",
     "expected one of mqtt, websockets, got 'ws'"),
    ('[[broker.listener]]\nport = 1\nrequire_certificate = "yes"\n', "[[broker.listener]] #1 require_certificate",
     "expected true or false"),
    ('[[broker.listener]]\nport = 1\ntls_version = "tlsv1"\n', "[[broker.listener]] #1 tls_version",
     "expected one of , tlsv1.2, tlsv1.3"),
    ('[[broker.listener]]\nport = 1\ncertfile = "server.crt"\n', "[[broker.listener]] #1 keyfile",
     "certfile is set, TLS needs both"),
    ('[[broker.listener]]\nport = 1\nkeyfile = "server.key"\n', "[[broker.listener]] #1 certfile",
     "keyfile is set, TLS needs both"),
    ('[[broker.listener]]\nport = 1\ncafile = "ca.crt"\n', "[[broker.listener]] #1 cafile",
     "is a TLS setting: set certfile and keyfile too"),
    ('[[broker.listener]]\nport = 1\ntls_version = "tlsv1.2"\n', "[[broker.listener]] #1 tls_version",
     "is a TLS setting"),
    ('[[broker.listener]]\nport = 1\ncertfile = "server.crt"\nkeyfile = "server.key"\nrequire_certificate = true\n',
     "[[broker.listener]] #1 require_certificate", "needs cafile"),
    ('[[broker.listener]]\nport = 1\ncertfile = "server.crt"\nkeyfile = "server.key"\ncafile = "ca.crt"\n'
     'use_identity_as_username = true\n', "[[broker.listener]] #1 use_identity_as_username",
     "needs require_certificate = true"),
    ('[[broker.listener]]\nport = 1\n[[broker.listener]]\nport = 2\ncertfile = "server.crt"\nkeyfile = "nope.key"\n',
     "[[broker.listener]] #2 keyfile", "no such file: "),
    ('[broker.listener]\nport = 1\n', "[[broker.listener]]", "expected [[broker.listener]] tables"),
    ('listener = 5\n', "[[broker.listener]]", "expected [[broker.listener]] tables, got 5"),
])
def test_bad_listener_tables_name_the_table_and_key(tmp_path, tables, key, expected):
    _tls_files(tmp_path)
    with pytest.raises(config.ConfigError) as e:
        load_text(tmp_path, "[broker]\n" + tables)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / "iot.toml"))
    assert f"{key}: " in msg and expected in msg, msg
