"""IOT_<SECTION>_<KEY> environment variables over the config file, and `iotctl config show`."""

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from daemons import config, configcli
from tests.support import ROOT


def load(tmp_path: Path, text: str = "", **env: str) -> config.Config:
    p = tmp_path / "iot.toml"
    p.write_text(text)
    return config.load(p, env)


def test_no_section_name_has_an_underscore():
    # The rule that splits IOT_INGEST_BATCH_SIZE into [ingest] batch_size depends on it.
    assert not [name for name in config.SECTIONS if "_" in name]


@pytest.mark.parametrize("var, text, section, key, expected", [
    ("IOT_BROKER_PORT", "1884", "broker", "port", 1884),
    ("IOT_BROKER_PORT", "0x75c", "broker", "port", 1884),  # any TOML integer
    ("IOT_BROKER_CONNECT_TIMEOUT", "2.5", "broker", "connect_timeout", 2.5),
    ("IOT_BROKER_CONNECT_TIMEOUT", "3", "broker", "connect_timeout", 3.0),
    ("IOT_BROKER_ALLOW_ANONYMOUS", "true", "broker", "allow_anonymous", True),
    ("IOT_BROKER_PERSISTENCE", "false", "broker", "persistence", False),
    ("IOT_MQTT_HOST", "broker.lan", "mqtt", "host", "broker.lan"),
    # A string key takes the variable as it is, even when it reads as a number, a boolean or TOML.
    ("IOT_MQTT_PASSWORD", "12345", "mqtt", "password", "12345"),
    ("IOT_MQTT_USERNAME", "true", "mqtt", "username", "true"),
    ("IOT_MQTT_CLIENT_ID_PREFIX", '"quoted"', "mqtt", "client_id_prefix", '"quoted"'),
    ("IOT_MQTT_HOST", "", "mqtt", "host", ""),
    ("IOT_LOG_LEVEL", "debug", "log", "level", "debug"),
    ("IOT_BROKER_PERSISTENT_CLIENT_EXPIRATION", "12h", "broker", "persistent_client_expiration", "12h"),
    ("IOT_BROKER_PERSISTENT_CLIENT_EXPIRATION", "", "broker", "persistent_client_expiration", ""),
    ("IOT_INGEST_TOPICS", '["sensors/#", "lab/+/t"]', "ingest", "topics", ("sensors/#", "lab/+/t")),
    ("IOT_INGEST_TOPICS", "[]", "ingest", "topics", ()),
    ("IOT_BROKER_LOG_TYPE", '["error", "subscribe"]', "broker", "log_type", ("error", "subscribe")),
    ("IOT_BROKER_MAX_INFLIGHT_PER_CLIENT", '{"*-ingest" = 9000, "meter-*" = 200}', "broker",
     "max_inflight_per_client", {"*-ingest": 9000, "meter-*": 200}),
    ("IOT_BROKER_MAX_INFLIGHT_PER_CLIENT", "{}", "broker", "max_inflight_per_client", {}),
    ("IOT_INGEST_BATCH_SIZE", "500", "ingest", "batch_size", 500),
    ("IOT_FACTORY_DASHBOARD_PORT", "8081", "factory", "dashboard_port", 8081),
    ("IOT_PLC_QUEUE_SIZE", "10", "plc", "queue_size", 10),
    ("IOT_TRANSFER_OUTBOX", "", "transfer", "outbox", None),  # "" unsets an optional path, as in the file
    ("IOT_MQTT_CAFILE", "/etc/ssl/ca.pem", "mqtt", "cafile", Path("/etc/ssl/ca.pem")),
])
def test_each_kind_of_key_takes_its_value_from_the_environment(tmp_path, var, text, section, key, expected):
    cfg = load(tmp_path, **{var: text})
    value = getattr(getattr(cfg, section), key)
    assert value == expected and type(value) is type(expected)
    assert cfg.origins[f"[{section}] {key}"] == f"environment {var}"


@pytest.mark.parametrize("var, text, key, expected", [
    ("IOT_BROKER_PORT", "x", "[broker] port", "expected an integer from 1 to 65535, got 'x'"),
    ("IOT_BROKER_PORT", "70000", "[broker] port", "expected an integer from 1 to 65535, got 70000"),
    ("IOT_BROKER_PORT", "", "[broker] port", "expected an integer from 1 to 65535, got ''"),
    ("IOT_BROKER_PORT", "1883.0", "[broker] port", "got 1883.0"),
    ("IOT_BROKER_PORT", "true", "[broker] port", "got True"),
    # TOML, but more than one value: refused as the string it is, on one line.
    ("IOT_BROKER_PORT", "1\nmax_connections = 2", "[broker] port", r"got '1\nmax_connections = 2'"),
    ("IOT_BROKER_CONNECT_TIMEOUT", "soon", "[broker] connect_timeout", "expected a number"),
    ("IOT_BROKER_CONNECT_TIMEOUT", "-1", "[broker] connect_timeout", "from 0.1 to 3600, got -1"),
    ("IOT_INGEST_BATCH_WAIT", "nan", "[ingest] batch_wait", "from 0.001 to 60, got nan"),
    ("IOT_BROKER_ALLOW_ANONYMOUS", "yes", "[broker] allow_anonymous", "expected true or false, got 'yes'"),
    ("IOT_BROKER_ALLOW_ANONYMOUS", "1", "[broker] allow_anonymous", "expected true or false, got 1"),
    ("IOT_LOG_LEVEL", "loud", "[log] level", "expected one of debug, info, warning, error, got 'loud'"),
    ("IOT_BROKER_PERSISTENT_CLIENT_EXPIRATION", "30", "[broker] persistent_client_expiration",
     "expected a whole number and a unit"),
    ("IOT_INGEST_TOPICS", "sensors/#", "[ingest] topics",
     "expected a list of strings, got 'sensors/#' (write it in TOML: [\"a\", \"b\"])"),
    ("IOT_INGEST_TOPICS", "[1]", "[ingest] topics", "expected a list of strings, got [1]"),
    ("IOT_BROKER_LOG_TYPE", '["loud"]', "[broker] log_type", "expected a list of strings from debug"),
    ("IOT_BROKER_MAX_INFLIGHT_PER_CLIENT", "meter-*=5", "[broker] max_inflight_per_client",
     "expected a table of names to integers from 1 to 65535, got 'meter-*=5' (write it in TOML: {\"name\" = 1})"),
    ("IOT_BROKER_MAX_INFLIGHT_PER_CLIENT", '{"m" = 0}', "[broker] max_inflight_per_client", "got {'m': 0}"),
    ("IOT_PATHS_STATE_DIR", "", "[paths] state_dir", "expected a path, got an empty string"),
])
def test_bad_values_name_the_variable_key_and_expectation(tmp_path, var, text, key, expected):
    with pytest.raises(config.ConfigError) as e:
        load(tmp_path, **{var: text})
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"environment {var}: {key}: ") and expected in msg, msg


@pytest.mark.parametrize("var, expected", [
    ("IOT_BROKR_PORT", "names no setting: expected IOT_<SECTION>_<KEY> with a section of PATHS, LOG, MQTT"),
    ("IOT_BROKER_PROT", "[broker] prot: unknown key (expected one of host, port, "),
    ("IOT_INGEST_BATCHSIZE", "[ingest] batchsize: unknown key"),
    ("IOT_", "names no setting"),
    ("IOT_Broker_Port", "[broker] port: variable names are upper case: IOT_BROKER_PORT"),
])
def test_an_iot_variable_that_names_no_key_is_refused(tmp_path, var, expected):
    with pytest.raises(config.ConfigError) as e:
        load(tmp_path, **{var: "1"})
    assert str(e.value).startswith(f"environment {var}: ") and expected in str(e.value), str(e.value)


@pytest.mark.parametrize("var, table", [
    ("IOT_BROKER_LISTENER", "broker.listener"), ("IOT_PLC_DEVICE", "plc.device"),
    ("IOT_FACTORY_DEVICE", "factory.device"), ("IOT_FACTORY_RULE", "factory.rule"),
])
def test_arrays_of_tables_cannot_be_set_from_the_environment(tmp_path, var, table):
    with pytest.raises(config.ConfigError) as e:
        load(tmp_path, **{var: "[]"})
    assert str(e.value) == (f"environment {var}: [{table.replace('.', '] ')}: [[{table}]] tables cannot be set "
                            "from the environment; set them in the file")


def test_reserved_variables_are_left_to_their_users(tmp_path):
    cfg = load(tmp_path, IOT_BROKER_FAILPOINT="crash-before-commit:40", IOT_PAHO_STOCK="1",
               IOT_CONFIG=str(tmp_path / "elsewhere.toml"), OTHER_PORT="x", MQTT_HOST="ignored")
    assert cfg == config.Config(source=tmp_path / "iot.toml") and not cfg.origins


def test_every_iot_variable_the_code_uses_is_reserved_or_a_key():
    """A variable the project uses for something else must be in RESERVED, or setting it would
    stop every daemon as an unknown key; and no key may take a reserved name. Used = named in a
    string literal anywhere but in the modules and tests of this mechanism."""
    keys = {config.env_name(s, f.name) for s, cls in config.SECTIONS.items() for f in dataclasses.fields(cls)}
    assert not keys & set(config.RESERVED)
    mine = {"config.py", "configcli.py", "test_config_env.py"}
    used = set()
    for folder in ("daemons", "tests", "deploy", "benchmarks"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".sh", ".service", ".conf") and path.is_file() and path.name not in mine:
                used |= set(re.findall(r"""["'](IOT_[A-Z0-9_]+)["']""", path.read_text(errors="replace")))
    assert "IOT_PAHO_STOCK" in used  # the search finds what it looks for
    assert not used - set(config.RESERVED) - keys, "IOT_ variables that would be refused as unknown keys"


def test_precedence_is_default_then_file_then_environment(tmp_path):
    cfg = load(tmp_path, "[broker]\nport = 1001\nmax_connections = 10\n[mqtt]\nhost = \"file.lan\"\n",
               IOT_BROKER_PORT="1002", IOT_INGEST_BATCH_SIZE="7")
    assert (cfg.broker.port, cfg.broker.max_connections, cfg.broker.sys_interval) == (1002, 10, 10.0)
    assert (cfg.mqtt.host, cfg.ingest.batch_size) == ("file.lan", 7)
    assert dict(cfg.origins) == {"[broker] port": "environment IOT_BROKER_PORT", "[broker] max_connections": "file",
                                 "[mqtt] host": "file", "[ingest] batch_size": "environment IOT_INGEST_BATCH_SIZE"}
    # Errors a daemon finds later name where the value came from.
    assert cfg.origin("[broker] port") == "environment IOT_BROKER_PORT"
    assert cfg.origin("[broker] max_connections") == cfg.origin("[broker] host") == tmp_path / "iot.toml"


def test_a_check_a_daemon_makes_after_loading_names_the_variable(tmp_path):
    from daemons.factory.dashboard.server import check_access  # noqa: PLC0415 - imports aiohttp

    with pytest.raises(config.ConfigError) as e:
        check_access(load(tmp_path, IOT_FACTORY_DASHBOARD_HOST="0.0.0.0"))
    assert str(e.value).startswith("environment IOT_FACTORY_DASHBOARD_HOST: [factory] dashboard_host: ")
    with pytest.raises(config.ConfigError) as e:
        check_access(load(tmp_path, '[factory]\ndashboard_host = "0.0.0.0"\n'))
    assert str(e.value).startswith(f"{tmp_path / 'iot.toml'}: [factory] dashboard_host: ")


def test_the_file_is_still_checked_where_the_environment_overrides_it(tmp_path):
    with pytest.raises(config.ConfigError, match=r"iot.toml: \[broker\] port: expected an integer"):
        load(tmp_path, "[broker]\nport = \"x\"\n", IOT_BROKER_PORT="1884")


def test_environment_applies_without_a_file(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "CHECKOUT_CONFIG", tmp_path / "none.toml")
    monkeypatch.setattr(config, "SYSTEM_CONFIG", tmp_path / "none2.toml")
    cfg = config.load(None, {"IOT_BROKER_PORT": "1884"})
    assert cfg.source is None and cfg.broker.port == 1884


def test_parse_alone_reads_no_environment(monkeypatch):
    monkeypatch.setenv("IOT_BROKER_PORT", "1884")
    monkeypatch.setenv("IOT_NO_SUCH", "x")
    assert config.parse({}, None).broker.port == 1883


def test_load_reads_the_process_environment_by_default(monkeypatch, tmp_path):
    monkeypatch.setenv("IOT_BROKER_PORT", "1884")
    p = tmp_path / "iot.toml"
    p.write_text("")
    assert config.load(p).broker.port == 1884


def test_relative_paths_from_the_environment_resolve_against_the_current_directory(monkeypatch, tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    p = tmp_path / "etc" / "iot.toml"
    p.write_text('[mqtt]\ncafile = "ca.pem"\n')
    cfg = config.load(p, {"IOT_PATHS_STATE_DIR": "state", "IOT_INGEST_DLQ_DIR": "../dlq",
                          "IOT_MQTT_CERTFILE": "/abs/client.pem", "IOT_MQTT_KEYFILE": "~/client.key"})
    assert cfg.paths.state_dir == tmp_path / "run" / "state"
    assert cfg.ingest.dlq_dir == tmp_path / "dlq"
    assert cfg.mqtt.certfile == Path("/abs/client.pem")
    assert cfg.mqtt.keyfile == Path("~/client.key").expanduser()
    assert cfg.mqtt.cafile == tmp_path / "etc" / "ca.pem"  # the file's own paths: against its folder


def test_a_reload_with_the_same_environment_reports_only_what_the_file_changed(tmp_path):
    """SIGHUP loads again through load(): an overridden key keeps its value whatever the file says."""
    env = {"IOT_BROKER_MAX_CONNECTIONS": "100"}
    before = load(tmp_path, "[broker]\nmax_connections = 10\n", **env)
    after = load(tmp_path, "[broker]\nmax_connections = 20\nmax_queued_messages = 5\n", **env)
    assert after.broker.max_connections == 100
    assert config.changed_keys(before, after) == ["[broker] max_queued_messages"]


# -- iotctl config show ----------------------------------------------------------------------

def _sources(text: str) -> dict[str, str]:
    """"[section] key" -> the comment after it, from show's output."""
    out, section = {}, None
    for line in text.splitlines():
        if m := re.match(r"^\[(\w+)\]$", line):
            section = m.group(1)
        elif m := re.match(r"^\[\[", line):
            section = None
        elif section and (m := re.match(r"^(\w+) = .*?  # (.+)$", line)):
            out[f"[{section}] {m.group(1)}"] = m.group(2)
    return out


def test_show_names_the_source_of_every_key(tmp_path):
    cfg = load(tmp_path, "[broker]\nport = 1001\n", IOT_MQTT_HOST="broker.lan")
    text = configcli.render(cfg)
    sources = _sources(text)
    expected = {f"[{s}] {f.name}" for s, cls in config.SECTIONS.items() for f in dataclasses.fields(cls)
                if not (config.is_tables(f) and getattr(getattr(cfg, s), f.name))}
    assert set(sources) == expected
    assert sources["[broker] port"] == "file"
    assert sources["[mqtt] host"] == "environment IOT_MQTT_HOST"
    assert sources["[mqtt] port"] == "default"
    assert "[[factory.device]]  # default" in text.splitlines()
    assert str(tmp_path / "iot.toml") in text.splitlines()[0]


def test_show_writes_toml_that_loads_back_into_the_same_configuration(tmp_path):
    for name in ("server.crt", "server.key"):
        (tmp_path / name).write_text("PEM\n")
    cfg = load(tmp_path, '[broker]\nlog_type = ["all"]\n[[broker.listener]]\nport = 8883\ncertfile = "server.crt"\n'
                         'keyfile = "server.key"\n[[plc.device]]\nname = "p1"\nsource = "modbus"\nhost = "h"\n'
                         '[[plc.device.register]]\nname = "t"\naddress = 3\nscale = 0.1\n'
                         '[[plc.device]]\nname = "p2"\n',
               IOT_MQTT_CLIENT_ID_PREFIX='odd "name" \\ \t\x7f', IOT_BROKER_MAX_INFLIGHT_PER_CLIENT='{"a.b" = 3}',
               IOT_TRANSFER_SETTLE_TIME="1e-3", IOT_FACTORY_CONTROLLER_SESSION="clean")
    back = config.parse(tomllib.loads(configcli.render(cfg)), tmp_path / "shown.toml")
    for name in config.SECTIONS:
        assert getattr(back, name) == getattr(cfg, name), name


def test_show_masks_secrets_and_never_reads_password_files(tmp_path):
    pw = tmp_path / "mqtt.password"
    pw.write_text("file-secret\n")
    pw.chmod(0)  # unreadable: show must not need it
    cfg = load(tmp_path, f'[mqtt]\npassword = "toml-secret"\npassword_file = "{pw}"\n',
               IOT_INGEST_MYSQL_PASSWORD="env-secret", IOT_FACTORY_DASHBOARD_PASSWORD_FILE=str(pw))
    text = configcli.render(cfg)
    for secret in ("toml-secret", "env-secret", "file-secret"):
        assert secret not in text
    lines = text.splitlines()
    assert any(re.fullmatch(r'password = "\*\*\*\*" +# file', line) for line in lines), text
    assert any(re.fullmatch(r'mysql_password = "\*\*\*\*" +# environment IOT_INGEST_MYSQL_PASSWORD', line)
               for line in lines), text
    assert f'password_file = "{pw}"' in text and f'dashboard_password_file = "{pw}"' in text
    # An empty secret is shown empty: whether one is set is not a secret.
    assert re.search(r'^username = "" ', text, re.M) and not re.search(r'^mysql_user = "\*', text, re.M)


def test_every_secret_looking_key_is_marked_secret():
    for cls in (*config.SECTIONS.values(), config.ListenerConfig, config.PlcDeviceConfig, config.RegisterConfig,
                config.FactoryDeviceConfig, config.SensorConfig, config.RuleConfig):
        for f in dataclasses.fields(cls):
            if str(f.type) == "str" and re.search(r"password|secret|token|passphrase", f.name):
                assert f.metadata.get("secret"), f"{cls.__name__}.{f.name} would be shown by iotctl config show"
