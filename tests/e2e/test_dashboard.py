"""iot-dashboard in a real browser (Debian's chromium, headless, driven by Playwright) against
real processes: our broker with the shipped ACL, iot-device, the dashboard, and for the Node
view the whole set under `iotctl up` (real supervisord). Every wait is on an event the page
shows, with a deadline; screenshots at desktop and phone sizes go to the test's tmp folder."""

from __future__ import annotations

import base64
import http.client
import os
import queue
import re
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from daemons import config, supervise
from tests.support import BIN, ROOT, free_port, port_open, retry_on_port_in_use, wait_for

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
ACL = ROOT / "etc" / "iot" / "acl"
T = 15_000  # ms: the longest a page may take to show what a test waits for
DEVICES = ('[[factory.device]]\nname = "press"\ninterval = 0.2\n'
           '[[factory.device.sensor]]\nname = "temperature"\nunit = "C"\nlow = 40.0\nhigh = 70.0\nalarm_high = 80.0\n'
           'hysteresis = 3.0\n'
           '[[factory.device.sensor]]\nname = "pressure"\nunit = "bar"\nlow = 100.0\nhigh = 150.0\n'
           '[[factory.device]]\nname = "conveyor"\ninterval = 0.2\n'
           '[[factory.device.sensor]]\nname = "speed"\nunit = "m/s"\nlow = 0.8\nhigh = 1.2\n')
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the dashboard's browser tests drive Debian's chromium "
                    "(./install.sh --local --test-deps installs it; `playwright install` is not used)", pytrace=False)
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield b
        b.close()


@pytest.fixture
def open_page(browser):
    """New pages (own browser context: own cookies); each fails its test on a script error or a
    Content-Security-Policy violation."""
    contexts, errors = [], []

    def open_(url: str, viewport: dict = DESKTOP):
        ctx = browser.new_context(viewport=viewport)
        contexts.append(ctx)
        page = ctx.new_page()
        page.on("pageerror", lambda e: errors.append(f"script error: {e}"))
        page.on("console", lambda m: "Content Security Policy" in m.text and errors.append(m.text))
        page.goto(url)
        return page

    yield open_
    for ctx in contexts:
        ctx.close()
    assert not errors, errors


def expect(locator):
    from playwright.sync_api import expect as pw_expect  # noqa: PLC0415

    return pw_expect(locator)


class Dashboard:
    def __init__(self, proc, port: int, config: Path):
        self.proc, self.port, self.config = proc, port, config
        self.url = f"http://127.0.0.1:{port}/"


def write_config(tmp_path: Path, mqtt_port: int, factory: str = "") -> Path:
    path = tmp_path / f"iot-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(f'[paths]\nstate_dir = "{tmp_path / "var"}"\n'
                    f'[mqtt]\nport = {mqtt_port}\nreconnect_min = 0.05\nreconnect_max = 0.5\n'
                    f'[factory]\n{factory}{DEVICES}')
    return path


def start_dashboard(daemon, tmp_path: Path, mqtt_port: int, factory: str = "", port: int | None = None) -> Dashboard:
    def on(port: int) -> Dashboard:
        cfg = write_config(tmp_path, mqtt_port, f"dashboard_port = {port}\n{factory}")
        proc, _ = daemon("iot-dashboard", "--config", str(cfg))
        return Dashboard(proc, port, cfg)

    return on(port) if port else retry_on_port_in_use(on)


@pytest.fixture
def broker(broker_factory):
    return broker_factory(f'acl_file = "{ACL}"\nsys_interval = 1\n')


def shot(page, path: Path) -> None:
    """The whole page, from its top (a sticky header would be drawn where the page is scrolled to)."""
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=path, full_page=True)


def card(page, device: str):
    return page.locator(f'[data-device="{device}"]')


def request(port: int, method: str, path: str, headers: dict | None = None, body: str | None = None):
    """One plain HTTP request: (response, body). No redirect is followed."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r, r.read()
    finally:
        c.close()


def websocket_handshake(port: int, **headers: str) -> int:
    """The status a WebSocket handshake on /ws gets (101 = accepted)."""
    key = base64.b64encode(os.urandom(16)).decode()
    r, _ = request(port, "GET", "/ws", {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                                         "Sec-WebSocket-Key": key, **headers})
    return r.status


def retained_state(mqtt_port: int, device: str) -> dict:
    """factory/state/<device> as the broker keeps it, read as the observer role."""
    got: queue.Queue = queue.Queue()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}")
    c.username_pw_set("observer")
    c.on_connect = lambda cl, ud, flags, rc, p: cl.subscribe(f"factory/state/{device}", 1)
    c.on_message = lambda cl, ud, m: got.put(m)
    c.connect("127.0.0.1", mqtt_port, 30)
    c.loop_start()
    try:
        m = got.get(timeout=10)
    finally:
        c.disconnect()
        c.loop_stop()
    assert m.retain
    return orjson.loads(m.payload)


# --- tests ---------------------------------------------------------------------------------------


def test_devices_online_values_change_stop_reaches_the_broker_and_kill_9_shows_offline(
        broker, daemon, tmp_path, open_page):
    dash = start_dashboard(daemon, tmp_path, broker.port)
    press, _ = daemon("iot-device", "--config", str(dash.config), "--device", "press")
    conveyor, _ = daemon("iot-device", "--config", str(dash.config), "--device", "conveyor")
    page = open_page(dash.url)
    expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=T)
    for name in ("press", "conveyor"):
        expect(card(page, name).locator(".status")).to_have_text("online", timeout=T)
        expect(card(page, name).locator(".state")).to_have_text("running", timeout=T)
    value = card(page, "press").locator('[data-sensor="temperature"] .value')
    expect(value).to_have_text(re.compile(r"^-?\d+\.\d+ C$"), timeout=T)
    before = value.inner_text()
    expect(value).not_to_have_text(before, timeout=T)  # live values
    expect(card(page, "press").locator('[data-sensor="temperature"] canvas').first).to_be_visible(timeout=T)
    page.wait_for_function("document.querySelectorAll('#traffic tbody tr').length > 10", timeout=T)
    shot(page, tmp_path / "dashboard-desktop.png")
    phone = open_page(dash.url, PHONE)
    expect(card(phone, "conveyor").locator(".status")).to_have_text("online", timeout=T)
    expect(card(phone, "conveyor").locator('[data-sensor="speed"] canvas').first).to_be_visible(timeout=T)
    shot(phone, tmp_path / "dashboard-phone.png")
    phone.goto(dash.url + "#traffic")
    phone.fill("#filter", "factory/telemetry/conveyor/+")
    expect(phone.locator("#traffic tbody tr").first).to_contain_text("factory/telemetry/conveyor/speed", timeout=T)
    assert "press" not in phone.locator("#traffic tbody").inner_text()
    phone.screenshot(path=tmp_path / "dashboard-phone-traffic.png")

    # Stop: on the page, in the broker's retained state, in both logs with who sent it.
    page.fill("#cmd-reason", "e2e check")
    card(page, "press").locator('button[data-cmd="stop"]').click()
    expect(card(page, "press").locator(".state")).to_have_text("stopped", timeout=T)
    expect(page.locator("#sent li").first).to_have_class("done", timeout=T)
    assert retained_state(broker.port, "press")["state"] == "stopped"
    assert card(page, "conveyor").locator(".state").inner_text() == "running"
    wait_for(lambda: "command device=press command=stop user=local peer=127.0.0.1" in dash.proc.log(), 5,
             what="the dashboard's command line")
    assert re.search(r'command device=press command=stop sender=dashboard reason="e2e check \(via dashboard by '
                     r'local from 127.0.0.1\)"', press.log()), press.log()
    # A setpoint through the command center (the sensor list follows the device chosen).
    page.select_option("#cmd-device", "conveyor")
    page.select_option("#cmd-sensor", "speed")
    page.fill("#cmd-value", "1.1")
    page.click('#command-form button[data-cmd="setpoint"]')
    expect(page.locator("#sent li").first).to_have_class("done", timeout=T)
    wait_for(lambda: retained_state(broker.port, "conveyor")["setpoints"]["speed"] == 1.1, 10, what="setpoint 1.1")

    # kill -9: no DISCONNECT, the broker publishes the device's will; only that device goes offline.
    press.kill()
    expect(card(page, "press").locator(".status")).to_have_text("offline", timeout=T)
    expect(card(page, "press")).to_have_class(re.compile(r"\boffline\b"))
    assert card(page, "conveyor").locator(".status").inner_text() == "online"
    assert conveyor.running()

    # A reload is instant: the retained status and state come with the snapshot.
    page.reload()
    expect(card(page, "press").locator(".status")).to_have_text("offline", timeout=3000)
    expect(card(page, "press").locator(".state")).to_have_text("stopped", timeout=3000)

    # Loopback without a password answers only loopback names: no DNS rebinding.
    r, _ = request(dash.port, "GET", "/", {"Host": f"rebind.example:{dash.port}"})
    assert r.status == 421
    assert websocket_handshake(dash.port, Origin="http://evil.example") == 403
    assert websocket_handshake(dash.port, Origin=f"http://127.0.0.1:{dash.port}") == 101


def test_beyond_loopback_nothing_works_without_the_password(broker, daemon, tmp_path, open_page):
    # No password file: refused at start with one config line, exit 78; so is a file others can read.
    cfg = write_config(tmp_path, broker.port, f'dashboard_host = "0.0.0.0"\ndashboard_port = {free_port()}\n')
    r = subprocess.run([str(BIN / "iot-dashboard"), "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 78, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "dashboard_host: '0.0.0.0' is beyond loopback" in r.stderr
    pw = tmp_path / "dashboard.password"
    pw.write_text("correct horse\n")
    os.chmod(pw, 0o644)
    cfg.write_text(cfg.read_text().replace("[factory]\n", f'[factory]\ndashboard_password_file = "{pw}"\n'))
    r = subprocess.run([str(BIN / "iot-dashboard"), "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 78 and "open to others (mode 0644)" in r.stderr, r.stderr
    os.chmod(pw, 0o600)

    dash = start_dashboard(daemon, tmp_path, broker.port,
                           f'dashboard_host = "0.0.0.0"\ndashboard_password_file = "{pw}"\n')
    daemon("iot-device", "--config", str(dash.config))
    port, origin = dash.port, f"http://127.0.0.1:{dash.port}"
    form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": origin}

    # Unauthenticated: the page sends to the login form, the API and the WebSocket refuse.
    r, _ = request(port, "GET", "/")
    assert r.status == 303 and r.getheader("Location") == "/login"
    assert request(port, "GET", "/ping")[0].status == 401
    assert websocket_handshake(port, Origin=origin) == 401
    assert websocket_handshake(port, Origin=origin, Cookie="iot_dashboard=forged") == 401
    r, body = request(port, "POST", "/login", form, "password=wrong")
    assert r.status == 401 and b"Wrong password." in body and not r.getheader("Set-Cookie")
    r, _ = request(port, "POST", "/login", {**form, "Origin": "http://evil.example"}, "password=correct+horse")
    assert r.status == 403  # a login posted from another site
    r, _ = request(port, "POST", "/login", form, "password=correct+horse")
    assert r.status == 303 and r.getheader("Location") == "/"
    cookie = r.getheader("Set-Cookie")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    session = cookie.split(";", 1)[0]
    assert request(port, "GET", "/ping", {"Cookie": session})[0].status == 204
    assert websocket_handshake(port, Origin="http://evil.example", Cookie=session) == 403
    assert websocket_handshake(port, Cookie=session) == 403  # no Origin: not a page of ours
    assert websocket_handshake(port, Origin=origin, Cookie=session) == 101
    assert "login refused: wrong password peer=127.0.0.1" in dash.proc.log()

    # The browser: login form, a wrong password, the right one, a command, logout.
    page = open_page(dash.url)
    expect(page).to_have_url(re.compile(r"/login$"))
    page.fill('input[name="password"]', "nope")
    page.click('button[type="submit"]')
    expect(page.locator(".error")).to_have_text("Wrong password.", timeout=T)
    page.fill('input[name="password"]', "correct horse")
    page.click('button[type="submit"]')
    expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=T)
    expect(card(page, "press").locator(".state")).to_have_text("running", timeout=T)
    card(page, "press").locator('button[data-cmd="stop"]').click()
    expect(card(page, "press").locator(".state")).to_have_text("stopped", timeout=T)
    assert retained_state(broker.port, "press")["state"] == "stopped"
    assert re.search(r"command device=press command=stop user=s-[0-9a-f]{8} peer=127\.0\.0\.1", dash.proc.log())
    page.screenshot(path=tmp_path / "dashboard-logged-in.png")
    (browser_session,) = [c for c in page.context.cookies() if c["name"] == "iot_dashboard"]
    page.click("#logout button")
    expect(page).to_have_url(re.compile(r"/login$"), timeout=T)
    assert not [c for c in page.context.cookies() if c["name"] == "iot_dashboard"]
    assert "logout user=s-" in dash.proc.log()
    # The server forgot it too: the old cookie is worth nothing now.
    assert request(port, "GET", "/ping", {"Cookie": f"iot_dashboard={browser_session['value']}"})[0].status == 401


def test_the_page_reconnects_after_the_dashboard_and_the_broker_restart(broker, broker_factory, daemon, tmp_path,
                                                                         open_page):
    dash = start_dashboard(daemon, tmp_path, broker.port)
    daemon("iot-device", "--config", str(dash.config))
    page = open_page(dash.url)
    conn = page.locator("#conn")
    expect(conn).to_have_attribute("data-state", "live", timeout=T)
    expect(card(page, "press").locator(".status")).to_have_text("online", timeout=T)

    assert dash.proc.stop() == 0  # SIGTERM with a page open: a clean stop
    expect(conn).to_have_attribute("data-state", "reconnecting", timeout=T)
    expect(conn).to_have_text("reconnecting…")
    start_dashboard(daemon, tmp_path, broker.port, port=dash.port)
    expect(conn).to_have_attribute("data-state", "live", timeout=T)
    value = card(page, "conveyor").locator('[data-sensor="speed"] .value')
    before = value.inner_text()
    expect(value).not_to_have_text(before, timeout=T)

    broker.proc.stop()
    expect(conn).to_have_attribute("data-state", "broker-down", timeout=T)
    broker_factory(f'acl_file = "{ACL}"\nsys_interval = 1\n', port=broker.port)
    expect(conn).to_have_attribute("data-state", "live", timeout=T)
    expect(card(page, "press").locator(".status")).to_have_text("online", timeout=T)
    before = value.inner_text()
    expect(value).not_to_have_text(before, timeout=T)


def test_node_view_shows_the_set_under_iotctl_up(tmp_path, open_page):
    port, dash_port = free_port(), free_port()
    while dash_port == port:  # two free_port() calls may hand out the same number
        dash_port = free_port()
    var = tmp_path / "var"
    cfg = tmp_path / "iot.toml"
    nobody = free_port()  # an upstream that is not there: the bridge waits, not connected
    cfg.write_text(f'[paths]\nstate_dir = "{var}"\n[broker]\nhost = "127.0.0.1"\nport = {port}\n'
                   f'acl_file = "{ACL}"\nsys_interval = 1\n'
                   f'[[broker.bridge]]\nname = "upstream"\naddress = ["127.0.0.1:{nobody}"]\n'
                   f'topic = ["factory/alarms/# out 1"]\n'
                   f'[mqtt]\nport = {port}\n'
                   f'[factory]\ndashboard_port = {dash_port}\n')
    shutil.copy(ROOT / "etc/iot/ingest.keys", tmp_path / "ingest.keys")
    os.chmod(tmp_path / "ingest.keys", 0o600)
    programs = supervise.programs(config.load(cfg))
    out = tmp_path / "up.out"
    with open(out, "wb") as f:
        up = subprocess.Popen([str(BIN / "iotctl"), "up", "--config", str(cfg)], stdout=f, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_for(lambda: b"stop: Ctrl-C" in out.read_bytes() or up.poll() is not None, 90, what="iotctl up ready")
        assert up.poll() is None, out.read_text()
        assert f"factory dashboard: http://127.0.0.1:{dash_port}/" in out.read_text()
        wait_for((var / "outbox").is_dir, 30, what="the outbox")
        (var / "outbox" / ".node-view.tmp").write_bytes(os.urandom(300_000))
        (var / "outbox" / ".node-view.tmp").rename(var / "outbox" / "node-view.bin")  # dot-files wait

        # supervisord's RUNNING (up for startsecs=1) is not yet "listening" for a busy host's dashboard.
        wait_for(lambda: port_open(dash_port), 30, what="the dashboard listening")
        page = open_page(f"http://127.0.0.1:{dash_port}/#node")
        daemons = page.locator("#daemons .body")
        try:
            expect(daemons).to_contain_text(f"{len(programs)} of {len(programs)} running", timeout=30_000)
        except AssertionError as e:  # say why a program is not running (once seen under load: the broker)
            logs = {p.name: (var / "log" / f"{p.name}.log") for p in programs}
            tails = {n: f.read_text(errors="replace")[-1500:] for n, f in logs.items() if f.exists()}
            raise AssertionError(f"{e}\nlogs: {tails}") from None
        for p in programs:
            expect(daemons.locator("tr", has_text=p.name).first).to_contain_text("RUNNING")
        # the broker's STATUS= line beside supervisord's state, its bridge named in it
        expect(daemons.locator("tr", has_text="iot-broker").first).to_contain_text("bridges=upstream:down",
                                                                                   timeout=30_000)
        broker = page.locator("#broker .body")
        expect(broker).to_contain_text("iot-broker", timeout=T)
        expect(broker).to_contain_text("clients connected")
        expect(broker.locator(".bridges tr", has_text="upstream")).to_contain_text("not connected", timeout=T)
        expect(page.locator("#ingest .body")).to_contain_text("running, connected", timeout=T)
        expect(page.locator("#ingest .body")).to_contain_text("0 entries")
        transfers = page.locator("#transfers .body")
        expect(transfers).to_contain_text("received", timeout=30_000)
        expect(transfers).to_contain_text("node-view.bin")
        shot(page, tmp_path / "dashboard-node.png")
        page.set_viewport_size(PHONE)
        shot(page, tmp_path / "dashboard-node-phone.png")
        page.goto(f"http://127.0.0.1:{dash_port}/#factory")
        expect(card(page, "env_station").locator(".status")).to_have_text("online", timeout=T)

        os.killpg(up.pid, signal.SIGINT)
        assert up.wait(60) == 0
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            # supervisord's programs may sit in process groups of their own: none may outlive the test.
            subprocess.run(["pkill", "-KILL", "-f", str(cfg)], check=False)
