"""Configuration from the environment in real processes: iot-broker started by IOT_ variables,
refused with exit 78 on a bad one, reloaded with them kept; `iotctl config show`."""

import os
import re
import signal
import subprocess

from tests.mqttraw import RawClient
from tests.support import BIN, retry_on_port_in_use, wait_for

BROKER = str(BIN / "iot-broker")
IOTCTL = str(BIN / "iotctl")


def test_broker_listens_where_the_environment_says(daemon, tmp_path):
    """No --config and a config file that sets nothing: host, port and the state folder (relative,
    so under the daemon's working directory) come from the environment alone."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")

    def start(port: int):
        env = {"IOT_CONFIG": str(empty), "IOT_BROKER_HOST": "127.0.0.1", "IOT_BROKER_PORT": str(port),
               "IOT_PATHS_STATE_DIR": "state"}
        proc, _ = daemon("iot-broker", env=env)
        return proc, port

    proc, port = retry_on_port_in_use(start)
    assert f"listening on 127.0.0.1:{port}" in proc.log()
    with RawClient(port) as c:
        c.connect_ok("from-env")
        c.disconnect()
    assert (tmp_path / "state" / "broker" / "store.db").exists()  # the daemon runs in tmp_path


def test_the_brokers_port_flag_overrides_the_environment(daemon, tmp_path):
    empty = tmp_path / "empty.toml"
    empty.write_text("")

    def start(port: int):
        env = {"IOT_BROKER_HOST": "127.0.0.1", "IOT_BROKER_PORT": "1", "IOT_PATHS_STATE_DIR": str(tmp_path)}
        proc, _ = daemon("iot-broker", "--config", str(empty), "--port", str(port), env=env)
        return proc, port

    proc, port = retry_on_port_in_use(start)
    assert f"listening on 127.0.0.1:{port}" in proc.log()


def _run(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, env={**os.environ, **env})


def test_a_bad_environment_value_ends_the_start_with_one_line_and_exit_78(tmp_path):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    r = _run([BROKER, "--config", str(empty)], IOT_BROKER_PORT="x", IOT_PATHS_STATE_DIR=str(tmp_path))
    assert r.returncode == 78
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].endswith("config error: environment IOT_BROKER_PORT: [broker] port: "
                             "expected an integer from 1 to 65535, got 'x'"), lines[0]

    r = _run([BROKER, "--config", str(empty)], IOT_BROKER_PROT="1884", IOT_PATHS_STATE_DIR=str(tmp_path))
    assert r.returncode == 78 and len(r.stderr.strip().splitlines()) == 1
    assert "environment IOT_BROKER_PROT: [broker] prot: unknown key" in r.stderr


def test_sighup_keeps_the_environments_values_and_names_only_what_the_file_changed(daemon, tmp_path):
    cfg = tmp_path / "iot.toml"
    base = f'[paths]\nstate_dir = "{tmp_path / "var"}"\n[broker]\nhost = "127.0.0.1"\n'

    def start(port: int):
        cfg.write_text(base + "max_connections = 10\n")
        proc, _ = daemon("iot-broker", "--config", str(cfg),
                         env={"IOT_BROKER_PORT": str(port), "IOT_BROKER_MAX_CONNECTIONS": "100"})
        return proc, port

    proc, port = retry_on_port_in_use(start)
    # The file now says another max_connections (the environment's stays) and another queue limit.
    cfg.write_text(base + "max_connections = 20\nmax_queued_messages = 5\n")
    proc.signal(signal.SIGHUP)
    wait_for(lambda: "iot-broker: reloaded " in proc.log(), 10, what="the reloaded line")
    line = next(line for line in proc.log().splitlines() if "iot-broker: reloaded " in line)
    assert 'restart_needed="[broker] max_queued_messages"' in line, line
    with RawClient(port) as c:  # still serving on the environment's port
        c.connect_ok("after-reload")
        c.disconnect()


def test_config_show_names_each_source_and_masks_secrets(tmp_path):
    pw = tmp_path / "mqtt.password"
    pw.write_text("file-secret\n")
    pw.chmod(0o600)
    cfg = tmp_path / "iot.toml"
    cfg.write_text(f'[mqtt]\nport = 1999\npassword = "toml-secret"\npassword_file = "{pw}"\n'
                   '[[broker.listener]]\nport = 9001\n')
    r = _run([IOTCTL, "config", "show", "--config", str(cfg)], IOT_MQTT_HOST="broker.lan",
             IOT_INGEST_MYSQL_PASSWORD="env-secret", IOT_INGEST_TOPICS='["sensors/#", "lab/#"]')
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for secret in ("toml-secret", "env-secret", "file-secret"):
        assert secret not in out

    def row(key: str, value: str, source: str) -> bool:
        return re.search(rf"^{re.escape(f'{key} = {value}')} +# {re.escape(source)}$", out, re.M) is not None

    assert row("host", '"broker.lan"', "environment IOT_MQTT_HOST")
    assert row("port", "1999", "file")
    assert row("keepalive", "60", "default")
    assert row("password", '"****"', "file")
    assert row("password_file", f'"{pw}"', "file")
    assert row("mysql_password", '"****"', "environment IOT_INGEST_MYSQL_PASSWORD")
    assert row("topics", '["sensors/#", "lab/#"]', "environment IOT_INGEST_TOPICS")
    assert "[[broker.listener]]  # file\nport = 9001\n" in out

    r = _run([IOTCTL, "config", "show", "--config", str(cfg)], IOT_MQTT_PORT="high")
    assert r.returncode == 78
    assert r.stderr.strip() == ("iotctl: config error: environment IOT_MQTT_PORT: [mqtt] port: "
                                "expected an integer from 1 to 65535, got 'high'")
