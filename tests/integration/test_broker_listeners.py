"""iot-broker's [[broker.listener]] tables with real clients: TLS (mosquitto_pub/sub, paho through
daemons.mqttclient), client certificates and use_identity_as_username, MQTT over WebSocket
(paho's transport="websockets", plain and TLS, and a raw client built on websockets' sans-IO
ClientProtocol for frames split and fragmented, ping, close and text frames), broken
handshakes, certificate reload on SIGHUP, and the start's errors. Certificates are made here
with the openssl command line."""

from __future__ import annotations

import os
import queue
import signal
import socket
import ssl
import subprocess
from pathlib import Path
from types import SimpleNamespace

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from websockets.client import ClientProtocol
from websockets.frames import CloseCode, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from daemons.config import MqttConfig
from daemons.mqttclient import MqttClient
from daemons.service import Log
from tests import mqttraw
from tests.integration.test_broker_interop import Sub, mosq_pub, subscribe_sync
from tests.support import BIN, PortInUse, free_port, port_open, wait_for

pytestmark = pytest.mark.slow

LOG = Log("test")
BROKER = str(BIN / "iot-broker")


# -- certificates ------------------------------------------------------------------------------


def _openssl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d, timeout=60)


EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _ca(d: Path, name: str) -> Path:
    _openssl(d, "req", "-x509", *EC, "-days", "2", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
             "-out", f"{name}.crt")
    return d / f"{name}.crt"


def _leaf(d: Path, ca: str, name: str, subject: str, ext: str = "") -> tuple[Path, Path]:
    _openssl(d, "req", *EC, "-subj", subject, "-keyout", f"{name}.key", "-out", f"{name}.csr")
    args = ["x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-days", "2", "-out", f"{name}.crt"]
    if ext:
        (d / f"{name}.ext").write_text(ext + "\n")
        args += ["-extfile", f"{name}.ext"]
    _openssl(d, *args)
    return d / f"{name}.crt", d / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> SimpleNamespace:
    """Two CAs, a server certificate for 127.0.0.1 from each (the second one for the reload),
    client certificates: alice (CN=alice), one without a CN, one from a CA the broker does not
    trust."""
    d = tmp_path_factory.mktemp("pki")
    p = SimpleNamespace(dir=d, ca=_ca(d, "ca1"), ca2=_ca(d, "ca2"), rogue_ca=_ca(d, "rogue"))
    p.server = _leaf(d, "ca1", "server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1")
    p.server2 = _leaf(d, "ca2", "server2", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1")
    p.alice = _leaf(d, "ca1", "alice", "/CN=alice")
    p.noname = _leaf(d, "ca1", "noname", "/O=No Name Ltd")
    p.rogue = _leaf(d, "rogue", "mallory", "/CN=mallory")
    p.both = d / "both.crt"
    p.both.write_bytes(p.ca.read_bytes() + p.ca2.read_bytes())
    return p


def tls(cert: tuple[Path, Path], **more: object) -> str:
    """The TLS keys of a listener table."""
    lines = [f'certfile = "{cert[0]}"', f'keyfile = "{cert[1]}"']
    for k, v in more.items():
        lines.append(f"{k} = " + (f'"{v}"' if isinstance(v, (str, Path)) else str(v).lower()))
    return "\n".join(lines) + "\n"


def start(broker_factory, *tables: str, args: tuple[str, ...] = ()):
    """iot-broker with one [[broker.listener]] per table (its keys but port) on free ports,
    again on other ports if one was taken first. Returns the broker and the listeners' ports."""
    for attempt in range(5):
        ports = [free_port() for _ in tables]
        text = "".join(f"[[broker.listener]]\nport = {p}\n{t}" for p, t in zip(ports, tables))
        try:
            return broker_factory(text, *args), ports
        except PortInUse:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def served_issuer(port: int, cafile: Path) -> str:
    """The CN of the CA that signed the certificate a new TLS connection to `port` is shown."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s, \
            ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
        return dict(x[0] for x in t.getpeercert()["issuer"])["commonName"]


def mqtt_client(port: int, client_id: str, **cfg: object) -> tuple[MqttClient, queue.Queue]:
    inbox: queue.Queue = queue.Queue()
    subs = cfg.pop("subscriptions", ())
    c = MqttClient(MqttConfig(port=port, **cfg), client_id, log=LOG, retry=False, subscriptions=subs,
                   on_message=inbox.put)
    c.start()
    return c, inbox


def connects(port: int, client_id: str, **cfg: object) -> bool:
    c, _ = mqtt_client(port, client_id, **cfg)
    try:
        return c.wait_connected(5)
    finally:
        c.stop()


def ws_client(port: int, client_id: str, cafile: Path | None = None,
              transport: str = "websockets") -> tuple[paho.Client, queue.Queue]:
    inbox: queue.Queue = queue.Queue()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311, transport=transport)
    if cafile is not None:
        c.tls_set(ca_certs=str(cafile))
    c.on_message = lambda _c, _u, m: inbox.put(m)
    c.connect("127.0.0.1", port, 30)
    c.loop_start()
    return c, inbox


def stop(*clients: paho.Client) -> None:
    for c in clients:
        c.disconnect()
        c.loop_stop()


# -- start ---------------------------------------------------------------------------------------


def test_one_start_line_per_listener_and_ready_once_all_are_bound(broker_factory, pki):
    default = free_port()
    b, (t, w, ws) = start(broker_factory, tls(pki.server), 'protocol = "websockets"\n',
                          'protocol = "websockets"\n' + tls(pki.server), args=("--port", str(default)))
    log = b.proc.log()
    # --port moves the default listener only; the config's port is not listened on.
    assert f"listening on 127.0.0.1:{default} protocol=mqtt tls=no" in log
    assert f"127.0.0.1:{b.port} " not in log
    assert f"listening on 127.0.0.1:{t} protocol=mqtt tls=yes" in log
    assert f"listening on 127.0.0.1:{w} protocol=websockets tls=no" in log
    assert f"listening on 127.0.0.1:{ws} protocol=websockets tls=yes" in log
    # READY=1 names them all (sent once the last one is bound).
    ready = b.notify.wait_for("STATUS=listening on ")
    assert ready == f"STATUS=listening on 127.0.0.1:{default}, 127.0.0.1:{t}, 127.0.0.1:{w}, 127.0.0.1:{ws}"
    assert all(port_open(p) for p in (default, t, w, ws))  # at READY=1, with no retry


def test_a_listener_that_cannot_bind_or_load_ends_the_start(tmp_path, pki):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")

    def run(table: str) -> subprocess.CompletedProcess:
        cfg = tmp_path / "iot.toml"
        cfg.write_text(f'[paths]\nstate_dir = "{tmp_path / "var"}"\n[broker]\nhost = "127.0.0.1"\n'
                       f'port = {free_port()}\n[[broker.listener]]\n{table}')
        return subprocess.run([BROKER, "--config", str(cfg)], capture_output=True, text=True, timeout=30)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        r = run(f'port = {taken}\nprotocol = "websockets"\n')
    assert r.returncode == 71, r.stderr
    assert f"cannot listen on 127.0.0.1:{taken}: Address already in use" in r.stderr
    r = run(f"port = {free_port()}\n" + tls((garbage, pki.server[1])))
    assert r.returncode == 78, r.stderr
    assert "[[broker.listener]] #1 certfile: cannot load" in r.stderr and str(garbage) in r.stderr
    r = run(f"port = {free_port()}\n" + tls(pki.server, cafile=tmp_path / "absent.crt", require_certificate=True))
    assert r.returncode == 78 and "[[broker.listener]] #1 cafile: no such file" in r.stderr, r.stderr


# -- TLS -----------------------------------------------------------------------------------------


def test_mosquitto_clients_over_tls_with_and_without_a_client_certificate(broker_factory, pki):
    b, (server_only, mutual) = start(broker_factory, tls(pki.server, cafile=pki.ca),
                                     tls(pki.server, cafile=pki.ca, require_certificate=True))
    ca = ("-h", "127.0.0.1", "--cafile", str(pki.ca))
    sub = Sub(server_only, *ca, "-t", "tls/#", "-q", "1", "-C", "2", "-W", "20")
    mosq_pub(mutual, *ca, "--cert", str(pki.alice[0]), "--key", str(pki.alice[1]), "-t", "tls/mutual",
             "-m", "with a certificate", "-q", "1")
    mosq_pub(b.port, "-h", "127.0.0.1", "-t", "tls/plain", "-m", "over plain TCP")
    assert sub.messages() == ["tls/mutual|1|0|with a certificate", "tls/plain|0|0|over plain TCP"]
    r = subprocess.run(["mosquitto_pub", "-p", str(mutual), *ca, "-t", "tls/x", "-m", "no certificate"],
                       capture_output=True, timeout=20)
    assert r.returncode != 0


def test_paho_over_tls_with_and_without_a_client_certificate(broker_factory, pki):
    _, (server_only, mutual) = start(broker_factory, tls(pki.server),
                                     tls(pki.server, cafile=pki.ca, require_certificate=True))
    sub, inbox = mqtt_client(server_only, "tls-sub", cafile=pki.ca, subscriptions=[("t/#", 1)])
    pub, _ = mqtt_client(mutual, "tls-pub", cafile=pki.ca, certfile=pki.alice[0], keyfile=pki.alice[1])
    try:
        assert sub.wait_connected(10) and sub.subscribed.wait(10), sub.last_error
        assert pub.wait_connected(10), pub.last_error
        pub.publish("t/mutual", b"from a client with a certificate", 1).wait_for_publish(10)
        sub.publish("t/server-only", b"from a client without one", 1).wait_for_publish(10)
        got = {inbox.get(timeout=10).payload for _ in range(2)}
        assert got == {b"from a client with a certificate", b"from a client without one"}
    finally:
        sub.stop()
        pub.stop()


def test_require_certificate_refuses_a_client_without_one_or_with_a_foreign_one(broker_factory, pki):
    b, (mutual,) = start(broker_factory, tls(pki.server, cafile=pki.ca, require_certificate=True))
    assert not connects(mutual, "no-cert", cafile=pki.ca)
    assert not connects(mutual, "foreign", cafile=pki.ca, certfile=pki.rogue[0], keyfile=pki.rogue[1])
    assert connects(mutual, "alice", cafile=pki.ca, certfile=pki.alice[0], keyfile=pki.alice[1])
    assert b.proc.running()


def test_tls_version_is_the_lowest_version_accepted(broker_factory, pki):
    _, (t12, t13) = start(broker_factory, tls(pki.server, tls_version="tlsv1.2"),
                          tls(pki.server, tls_version="tlsv1.3"))

    def handshake(port: int, highest: ssl.TLSVersion) -> str:
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        ctx.maximum_version = highest
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s, \
                ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
            return t.version()

    assert handshake(t12, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    assert handshake(t13, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    with pytest.raises(ssl.SSLError):
        handshake(t13, ssl.TLSVersion.TLSv1_2)


def test_use_identity_as_username_names_the_client_by_its_certificate_cn(broker_factory, pki):
    b, (mutual,) = start(broker_factory, tls(pki.server, cafile=pki.ca, require_certificate=True,
                                             use_identity_as_username=True), args=("-v",))
    assert connects(mutual, "cn-test", cafile=pki.ca, certfile=pki.alice[0], keyfile=pki.alice[1],
                    username="mallory", password="whatever")
    line = next(x for x in b.proc.log().splitlines() if "client connected client=cn-test " in x)
    assert f"username=alice port={mutual}" in line
    # A certificate without a CN gives no identity: the connection is closed.
    assert not connects(mutual, "no-cn", cafile=pki.ca, certfile=pki.noname[0], keyfile=pki.noname[1])
    assert "client certificate has no subject CN" in b.proc.log()


def test_sighup_reloads_certificates_for_new_connections_and_keeps_open_ones(broker_factory, pki, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.crt", live / "server.key"

    def install(pair: tuple[Path, Path]) -> None:
        # As a renewal does: the new file is written beside and renamed over the old.
        for src, dst in zip(pair, (cert, key)):
            dst.with_suffix(".tmp").write_bytes(src.read_bytes())
            os.replace(dst.with_suffix(".tmp"), dst)

    install(pki.server)
    b, (t, ws) = start(broker_factory, tls((cert, key)), 'protocol = "websockets"\n' + tls((cert, key)))
    assert served_issuer(t, pki.both) == served_issuer(ws, pki.both) == "ca1"
    old, inbox = mqtt_client(t, "old-conn", cafile=pki.ca, subscriptions=[("r/#", 1)])
    try:
        assert old.wait_connected(10) and old.subscribed.wait(10), old.last_error

        install(pki.server2)
        b.proc.signal(signal.SIGHUP)
        wait_for(lambda: "TLS certificates reloaded" in b.proc.log(), 10, what="the reload")
        assert served_issuer(t, pki.both) == served_issuer(ws, pki.both) == "ca2"
        assert not connects(t, "trusts-ca1-only", cafile=pki.ca)
        new, _ = mqtt_client(t, "new-conn", cafile=pki.ca2)
        assert new.wait_connected(10), new.last_error
        new.publish("r/x", b"to the connection opened before the reload", 1).wait_for_publish(10)
        assert inbox.get(timeout=10).payload == b"to the connection opened before the reload"
        assert old.connected
        new.stop()

        # A file that does not load is refused, named, and the certificates in use stay.
        cert.write_text("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
        b.proc.signal(signal.SIGHUP)
        wait_for(lambda: "reload failed" in b.proc.log(), 10, what="the refused reload")
        line = next(x for x in b.proc.log().splitlines() if "reload failed" in x)
        assert "[[broker.listener]] #1 certfile: cannot load" in line
        assert served_issuer(t, pki.both) == served_issuer(ws, pki.both) == "ca2"
        assert old.connected
    finally:
        old.stop()


# -- WebSocket -----------------------------------------------------------------------------------


def test_large_payloads_arrive_whole_over_tcp_tls_and_websocket(broker_factory, pki):
    """Payloads from 64 KiB to 5 MiB (read straight into their packets' own buffers, written out
    without being copied into the packet), mixed with small ones, arrive whole and in order from
    and to clients on every kind of listener: plain TCP, TLS and WebSocket."""
    b, (t, w) = start(broker_factory, tls(pki.server), 'protocol = "websockets"\n')

    kinds = {"tcp": (b.port, None, "tcp"), "tls": (t, pki.ca, "tcp"), "ws": (w, None, "websockets")}
    subs = {k: ws_client(where[0], f"sub-{k}", *where[1:]) for k, where in kinds.items()}
    # paho's WebSocket transport drops the rest of a frame the socket took only in part (until
    # its next packet), so the WebSocket publisher is a raw one.
    pubs = {k: ws_client(kinds[k][0], f"pub-{k}", *kinds[k][1:])[0] for k in ("tcp", "tls")}
    raw = WsRaw(w)
    try:
        raw.ws.send_binary(mqttraw.connect("pub-ws"))
        raw.flush()
        assert raw.packet().raw == mqttraw.connack(0)
        for c, _ in subs.values():
            subscribe_sync(c, [("big/#", 1)])
        payloads = [os.urandom(n) for n in (64 * 1024, 10, 1024 * 1024 + 3, 7, 5 * 1024 * 1024)]
        for k, c in pubs.items():
            for data in payloads:
                info = c.publish(f"big/{k}", data, qos=1)
                info.wait_for_publish(30)
                assert info.is_published(), (k, len(data))
        for mid, data in enumerate(payloads, 1):
            raw.ws.send_binary(mqttraw.publish("big/ws", data, qos=1, mid=mid))
            raw.flush()
            assert raw.packet().raw == mqttraw.puback(mid)
        for k, (_, inbox) in subs.items():
            got: dict[str, list[bytes]] = {name: [] for name in kinds}
            for _ in range(len(kinds) * len(payloads)):
                m = inbox.get(timeout=30)
                got[m.topic.split("/")[1]].append(m.payload)
            assert all(v == payloads for v in got.values()), (
                k, {name: [len(p) for p in v] for name, v in got.items()})
    finally:
        raw.close()
        stop(*pubs.values(), *(c for c, _ in subs.values()))


def test_websocket_and_tcp_clients_reach_each_other(broker_factory, pki):
    b, (w, ws) = start(broker_factory, 'protocol = "websockets"\n', 'protocol = "websockets"\n' + tls(pki.server))
    plain, plain_in = ws_client(w, "ws-plain")
    secure, secure_in = ws_client(ws, "ws-tls", cafile=pki.ca)
    try:
        subscribe_sync(plain, [("x/#", 1)])
        subscribe_sync(secure, [("x/#", 1)])
        tcp = Sub(b.port, "-h", "127.0.0.1", "-t", "x/#", "-q", "1", "-C", "3", "-W", "20")

        mosq_pub(b.port, "-h", "127.0.0.1", "-t", "x/tcp", "-m", "over TCP", "-q", "1")
        plain.publish("x/ws", b"over WebSocket", 1).wait_for_publish(10)
        secure.publish("x/wss", b"over WebSocket with TLS", 1).wait_for_publish(10)

        sent = {("x/tcp", b"over TCP"), ("x/ws", b"over WebSocket"), ("x/wss", b"over WebSocket with TLS")}
        for inbox in (plain_in, secure_in):
            got = {(m.topic, m.payload) for m in (inbox.get(timeout=10) for _ in range(3))}
            assert got == sent
        assert set(tcp.messages()) == {"x/tcp|1|0|over TCP", "x/ws|1|0|over WebSocket",
                                       "x/wss|1|0|over WebSocket with TLS"}
    finally:
        stop(plain, secure)


class WsRaw:
    """A WebSocket client on a plain socket, framing by websockets' sans-IO ClientProtocol: the
    test decides how MQTT bytes are cut into frames."""

    def __init__(self, port: int, subprotocols: tuple[str, ...] = ("mqtt",)):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.ws = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/mqtt"), subprotocols=list(subprotocols))
        self.ws.send_request(self.ws.connect())
        self.events: list = []
        self.mqtt = bytearray()
        self.eof = False
        self.flush()
        response = self.next_event()
        assert isinstance(response, Response) and response.status_code == 101, response

    def flush(self) -> None:
        for data in self.ws.data_to_send():
            if data:
                try:
                    self.sock.sendall(data)
                except (ConnectionResetError, BrokenPipeError):
                    pass  # the broker has closed: the next read says so

    def next_event(self):
        while not self.events:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:  # our close echo met a socket the broker had closed
                data = b""
            if data:
                self.ws.receive_data(data)
            else:
                self.eof = True
                self.ws.receive_eof()
            self.events += self.ws.events_received()
            self.flush()
            if self.eof and not self.events:
                raise EOFError("the broker closed the connection")
        return self.events.pop(0)

    def packet(self) -> mqttraw.Packet:
        """The next MQTT packet from the binary frames, however they were cut."""
        while (got := mqttraw.split_packet(self.mqtt)) is None:
            event = self.next_event()
            assert event.opcode in (Opcode.BINARY, Opcode.CONT), event
            self.mqtt += event.data
        pkt, n = got
        del self.mqtt[:n]
        return pkt

    def closed_with(self) -> int | None:
        """The close code the broker sent, once the connection has ended."""
        code = None
        while True:
            try:
                event = self.next_event()
            except EOFError:
                break
            if event.opcode is Opcode.CLOSE:
                code = self.ws.close_rcvd.code
        return code

    def close(self) -> None:
        self.sock.close()


def test_websocket_frames_carry_mqtt_in_any_split_and_control_frames_are_answered(broker_factory):
    b, (w,) = start(broker_factory, 'protocol = "websockets"\n')
    c = WsRaw(w)
    try:
        connect = mqttraw.connect("split", keepalive=30)
        for part in (connect[:1], connect[1:5], connect[5:]):  # one packet over three messages
            c.ws.send_binary(part)
        c.flush()
        assert c.packet().raw == mqttraw.connack(0)
        # Two packets in one message of two fragments, the second packet cut between them.
        both = mqttraw.subscribe(1, [("s/#", 1)]) + mqttraw.publish("s/a", b"hello", qos=1, mid=2)
        c.ws.send_binary(both[:12], fin=False)
        c.ws.send_continuation(both[12:], fin=True)
        c.flush()
        got = [c.packet() for _ in range(3)]
        assert sorted(p.name for p in got) == ["PUBACK", "PUBLISH", "SUBACK"]
        assert mqttraw.parse_publish(next(p for p in got if p.name == "PUBLISH")).payload == b"hello"
        c.ws.send_ping(b"are you there")
        c.flush()
        pong = c.next_event()
        assert (pong.opcode, pong.data) == (Opcode.PONG, b"are you there")
        c.ws.send_binary(mqttraw.pingreq())
        c.flush()
        assert c.packet().raw == mqttraw.pingresp()
        c.ws.send_close(CloseCode.GOING_AWAY)
        c.flush()
        assert c.closed_with() == CloseCode.GOING_AWAY  # echoed, then the socket closed
    finally:
        c.close()

    # A text frame is not MQTT: the connection is closed with 1003 (unsupported data).
    c = WsRaw(w)
    try:
        c.ws.send_binary(mqttraw.connect("texter"))
        c.flush()
        assert c.packet().raw == mqttraw.connack(0)
        c.ws.send_text(b"\x10\x00")
        c.flush()
        assert c.closed_with() == CloseCode.UNSUPPORTED_DATA
    finally:
        c.close()
    assert "WebSocket error; closing connection" in b.proc.log() and "code=1003" in b.proc.log()


UPGRADE = ("GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")


@pytest.mark.parametrize("request_text, status, says", [
    ("GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 426, "missing Connection header"),
    (UPGRADE + "Sec-WebSocket-Protocol: chat\r\n\r\n", 400, "invalid subprotocol; expected one of mqtt, mqttv3.1"),
    (UPGRADE + "\r\n", 400, "missing subprotocol"),
    (UPGRADE.replace("GET", "POST") + "Sec-WebSocket-Protocol: mqtt\r\n\r\n", 405, "POST"),
    ("\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00\r\n\r\n", 400, "not an HTTP/1.1 request"),
])
def test_a_broken_websocket_handshake_gets_an_http_error_and_the_broker_keeps_serving(
        broker_factory, request_text, status, says):
    b, (w,) = start(broker_factory, 'protocol = "websockets"\n')
    with socket.create_connection(("127.0.0.1", w), timeout=10) as s:
        s.sendall(request_text.encode("latin-1"))
        reply = b""
        while chunk := s.recv(65536):  # the broker closes after its answer
            reply += chunk
    assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply
    assert says.encode() in reply, reply
    assert "WebSocket handshake refused" in b.proc.log()
    c = WsRaw(w, subprotocols=("mqttv3.1",))  # the other subprotocol MQTT clients ask for
    try:
        c.ws.send_binary(mqttraw.connect("after"))
        c.flush()
        assert c.packet().raw == mqttraw.connack(0)
    finally:
        c.close()


def test_a_websocket_frame_cannot_hold_more_than_max_connect_size_before_connect(broker_factory):
    """Frames may be as large as max_packet_size, and are buffered whole before their bytes
    reach the MQTT reader: before CONNECT, max_connect_size still bounds what is held."""
    b, (w,) = start(broker_factory, 'protocol = "websockets"\n')
    c = WsRaw(w)
    try:
        c.ws.send_binary(bytes(1024 * 1024))
        frame = b"".join(c.ws.data_to_send())
        try:
            c.sock.sendall(frame[:300 * 1024])  # a frame of 1 MiB, not finished
        except (ConnectionResetError, BrokenPipeError):
            pass  # closed while we wrote
        c.closed_with()  # returns once the broker has closed the connection
        assert c.eof
    finally:
        c.close()
    assert "WebSocket bytes before CONNECT over max_connect_size" in b.proc.log()
    c = WsRaw(w)  # the listener serves on
    try:
        c.ws.send_binary(mqttraw.connect("next"))
        c.flush()
        assert c.packet().raw == mqttraw.connack(0)
    finally:
        c.close()


def test_a_refused_login_over_websocket_gets_its_connack_and_a_close(broker_factory, tmp_path):
    """The refusal path of a login (at once, and slowed down after repeated failures) is the
    same for a WebSocket connection: CONNACK 4 in a binary frame, then the close."""
    pw = tmp_path / "passwd"
    subprocess.run([str(BIN / "iotctl"), "passwd", "-c", "-b", str(pw), "alice", "right"], check=True, timeout=60)
    w = free_port()
    b = broker_factory(f'password_file = "{pw}"\n[[broker.listener]]\nport = {w}\nprotocol = "websockets"\n')
    for attempt in range(5):  # the fourth and fifth answers come late: the same path, delayed
        c = WsRaw(w)
        try:
            c.ws.send_binary(mqttraw.connect(f"guess-{attempt}", username="alice", password=b"wrong"))
            c.flush()
            assert c.packet().raw == mqttraw.connack(4)
            assert c.closed_with() is not None or c.eof
        finally:
            c.close()
    c = WsRaw(w)
    try:
        c.ws.send_binary(mqttraw.connect("alice-1", username="alice", password=b"right"))
        c.flush()
        assert c.packet().raw == mqttraw.connack(0)
    finally:
        c.close()
    assert "Traceback" not in b.proc.log() and "login refused" in b.proc.log()
