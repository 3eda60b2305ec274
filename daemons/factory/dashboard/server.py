"""iot-dashboard's web server (aiohttp) and its MQTT bridge (paho through MqttClient).

paho's thread only queues each message for the event loop (at most INBOX waiting: past it
a message is counted and left out, never held up: a dashboard that falls behind must not slow
the factory's publishers through the broker's flow control); there the board (board.py) takes
it in and returns events. Events wait FLUSH seconds and go out together,
one frame to every open page; a page gets the whole board as its first frame, so a reload
shows everything at once. Each page has a bounded queue of frames: one that falls that far
behind is closed (it reconnects and starts again from a snapshot) rather than holding the
others up or growing our memory. While no page is open nothing is queued at all.

A command from a page is checked (board.py, then messages.parse_command as the device will),
published at QoS 1 to factory/commands/dashboard/<device>, logged with who sent it, and
answered once the broker's PUBACK is in: one future per packet id, removed in `finally`.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from pathlib import Path

import orjson
import paho.mqtt.client as paho
from aiohttp import WSCloseCode, WSMsgType, web

from ... import metrics, service
from ...config import ConfigError
from ...metrics import Families
from ...mqttclient import MqttClient
from ...service import Exit, Service
from .. import METRICS_OFFSET, as_role
from .. import messages as M
from . import auth
from .board import Board
from .node import Node

STATIC = Path(__file__).with_name("static")
FLUSH = 0.25  # seconds events wait to go out together: a page redraws at most 4 times a second
NODE_EVERY = 5.0  # seconds between Node view readings, while a page is open
PAGES = 16  # pages open at once
QUEUE = 64  # frames waiting for one page
PENDING = 5000  # events waiting for the next flush; past it every page gets a fresh snapshot instead
INBOX = 10_000  # MQTT messages waiting for the loop
DRAIN = 500  # messages taken in per loop callback, so that pages and commands get their turn
ACK_TIMEOUT = 10.0
LOGIN_DELAY = 1.0  # seconds a wrong password costs; guesses are taken one at a time
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make a form POST say "Origin: null"
    "Cache-Control": "no-cache",
    "Server": "iot-dashboard",  # not aiohttp's name and version
}


class Page:
    """One open page: its WebSocket, who it is, the frames waiting for it."""

    __slots__ = ("ws", "token", "user", "peer", "queue", "writer")

    def __init__(self, ws: web.WebSocketResponse, token: str, user: str, peer: str):
        self.ws, self.token, self.user, self.peer = ws, token, user, peer
        self.queue: asyncio.Queue[str] = asyncio.Queue(QUEUE)
        self.writer: asyncio.Task | None = None

    def send(self, frame: str) -> bool:
        try:
            self.queue.put_nowait(frame)
            return True
        except asyncio.QueueFull:
            return False


class Dashboard:
    def __init__(self, svc: Service, password: str | None):
        cfg = svc.config
        fc = cfg.factory
        self.svc, self.log, self.password = svc, svc.log, password
        self.loop = asyncio.get_running_loop()
        self.board = Board(fc.device)
        self.sessions = auth.Sessions()
        self.node = Node(cfg)
        self.node_info: dict | None = None
        self.pages: set[Page] = set()
        self.pending: list[dict] = []
        self.overflow = False
        self.commands = 0
        self._dirty = asyncio.Event()
        self._node_wanted = asyncio.Event()
        self._acks: dict[int, asyncio.Future] = {}
        self._login_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._login_page = (STATIC / "login.html").read_text()
        self._inbox: deque[tuple[str, bytes, int, bool]] = deque()
        self._drain_asked = False
        self.dropped = 0  # messages left out because the loop was INBOX behind
        self._dropped_shown = 0
        self._dropped_logged = 0.0
        call = self.loop.call_soon_threadsafe
        self.mqtt = MqttClient(
            as_role(cfg.mqtt, fc.dashboard_username), "dashboard", log=self.log,
            subscriptions=[(f"{M.PREFIX}/#", 1), ("$SYS/#", 0)],
            on_message=self._paho_message,
            on_connect=lambda _present: call(self._broker, True),
            on_disconnect=lambda: call(self._broker, False),
            on_publish=lambda mid: call(self._puback, mid))

    # --- paho's thread: queue, nothing else ------------------------------------------------------

    def _paho_message(self, msg: paho.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # not a topic MQTT allows; nothing to show
            return
        if len(self._inbox) >= INBOX:
            self.dropped += 1
            return
        self._inbox.append((topic, msg.payload, msg.qos, msg.retain))
        if not self._drain_asked:  # one wake-up for many messages
            self._drain_asked = True
            self.loop.call_soon_threadsafe(self._drain)

    # --- the loop -------------------------------------------------------------------------------

    def _drain(self) -> None:
        self._drain_asked = False  # before taking: a message queued from here on asks again
        inbox, feed = self._inbox, self.board.feed
        for _ in range(min(len(inbox), DRAIN)):
            self._emit(feed(*inbox.popleft()))
        if inbox and not self._drain_asked:
            self._drain_asked = True
            self.loop.call_soon(self._drain)
        if self.dropped != self._dropped_shown:
            self._dropped_shown = self.dropped
            self._emit([{"t": "dropped", "n": self.dropped}])
            if self.loop.time() - self._dropped_logged >= 60:  # a line a minute at most
                self._dropped_logged = self.loop.time()
                self.log.warning("falling behind the broker: messages left out of the page", total=self.dropped)

    def _broker(self, connected: bool) -> None:
        if self.board.broker != connected:
            self.board.broker = connected
            self._emit([{"t": "broker", "connected": connected}])

    def _puback(self, mid: int) -> None:
        fut = self._acks.get(mid)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _emit(self, events: list[dict]) -> None:
        if not events or not self.pages:
            return  # the board has it; a page that opens gets it in its snapshot
        self.pending += events
        if len(self.pending) > PENDING:
            self.pending.clear()
            self.overflow = True
        self._dirty.set()

    def _snapshot(self) -> dict:
        return {**self.board.snapshot(), "node": self.node_info, "auth": self.password is not None,
                "dropped": self.dropped}

    def _flush(self) -> None:
        if self.overflow:
            frame, self.overflow = orjson.dumps([self._snapshot()]).decode(), False
        elif self.pending:
            frame = orjson.dumps(self.pending).decode()
        else:
            return
        self.pending = []
        for page in list(self.pages):
            if not page.send(frame):
                self._close(page, "too slow: reconnect for a fresh snapshot")

    async def _flusher(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(FLUSH)
            self._dirty.clear()
            self._flush()

    async def _node_poller(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._node_wanted.wait(), NODE_EVERY if self.pages else None)
            except TimeoutError:
                pass
            self._node_wanted.clear()
            if self.pages:
                self.node_info = await asyncio.to_thread(self.node.gather)
                self._emit([{"t": "node", **self.node_info}])

    def _close(self, page: Page, why: str) -> None:
        self.pages.discard(page)
        self.log.info("page closed", user=page.user, peer=page.peer, reason=why)
        self._spawn(page.ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=why.encode()[:120]))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self._tasks.discard)

    def families(self) -> Families:
        """The counters as Prometheus metrics (daemons/metrics.py); run on the loop."""
        out = Families()
        out.gauge("iot_dashboard_pages", "Pages open (WebSocket connections).", len(self.pages))
        out.gauge("iot_dashboard_devices_online", "Devices whose status is online.", self.board.online())
        out.counter("iot_dashboard_commands", "Commands sent from the page.", self.commands)
        out.counter("iot_dashboard_updates_left_out", "Updates left out for a page too slow to take them.",
                    self.dropped)
        out.gauge("iot_dashboard_broker_connected", "1 while connected to the broker.", self.mqtt.connected)
        return out

    def summary(self) -> str:
        return (f"pages={len(self.pages)} devices_online={self.board.online()}/{len(self.board.devices)} "
                f"commands={self.commands}" + (f" left_out={self.dropped}" if self.dropped else "")
                + ("" if self.mqtt.connected else " (broker not connected)"))

    # --- HTTP -------------------------------------------------------------------------------------

    def _session(self, request: web.Request) -> str | None:
        """The request's live session token; "" when there is no password (loopback only)."""
        if self.password is None:
            return ""
        token = request.cookies.get(auth.COOKIE)
        return token if self.sessions.check(token) else None

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        if self.password is None and not auth.is_loopback(auth.host_name(request.host)):
            raise web.HTTPMisdirectedRequest(text="this dashboard answers only to loopback names "
                                                  "(http://127.0.0.1 or http://localhost)\n")
        if request.method == "POST" and not auth.same_origin(request.headers.get("Origin"), request.host):
            raise web.HTTPForbidden(text="cross-origin request refused\n")
        return await handler(request)

    async def _headers(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(HEADERS)

    async def index(self, request: web.Request) -> web.StreamResponse:
        if self._session(request) is None:
            raise web.HTTPSeeOther("/login")
        return web.FileResponse(STATIC / "index.html")

    async def ping(self, request: web.Request) -> web.Response:
        """What a page asks before it reconnects: 204, or 401 when it must log in (again)."""
        return web.Response(status=204 if self._session(request) is not None else 401)

    def _login_form(self, error: str = "", status: int = 200) -> web.Response:
        html = self._login_page.replace("<!--error-->", f'<p class="error" role="alert">{error}</p>' if error else "")
        return web.Response(text=html, content_type="text/html", status=status)

    async def login_form(self, request: web.Request) -> web.Response:
        if self.password is None:
            raise web.HTTPSeeOther("/")
        return self._login_form()

    async def login(self, request: web.Request) -> web.Response:
        if self.password is None:
            raise web.HTTPSeeOther("/")
        given = (await request.post()).get("password")
        peer = request.remote or "-"
        async with self._login_lock:  # one guess at a time, each wrong one costing LOGIN_DELAY
            if not isinstance(given, str) or not auth.password_ok(given, self.password):
                self.log.warning("login refused: wrong password", peer=peer)
                await asyncio.sleep(LOGIN_DELAY)
                return self._login_form("Wrong password.", 401)
        token = self.sessions.create(peer)
        self.log.info("login", user=auth.Sessions.label(token), peer=peer)
        resp = web.Response(status=303, headers={"Location": "/"})
        resp.set_cookie(auth.COOKIE, token, httponly=True, samesite="Strict", path="/")
        return resp

    async def logout(self, request: web.Request) -> web.Response:
        token = request.cookies.get(auth.COOKIE)
        if token and self.sessions.check(token):
            self.log.info("logout", user=auth.Sessions.label(token), peer=request.remote or "-")
            for page in [p for p in self.pages if p.token == token]:
                self._close(page, "logged out")
        self.sessions.drop(token)
        resp = web.Response(status=303, headers={"Location": "/login" if self.password else "/"})
        resp.del_cookie(auth.COOKIE, path="/")
        return resp

    # --- WebSocket ----------------------------------------------------------------------------

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        token = self._session(request)
        if token is None:
            raise web.HTTPUnauthorized(text="log in first\n")
        if not auth.same_origin(request.headers.get("Origin"), request.host):
            raise web.HTTPForbidden(text="cross-origin WebSocket refused\n")
        if len(self.pages) >= PAGES:
            raise web.HTTPServiceUnavailable(text=f"{PAGES} pages are open already\n")
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=4096, compress=False)  # no zlib state per page
        await ws.prepare(request)
        page = Page(ws, token, auth.Sessions.label(token) if self.password else "local", request.remote or "-")
        page.writer = asyncio.create_task(self._write(page))
        self._flush()  # what waits predates the snapshot this page gets first
        page.send(orjson.dumps([self._snapshot()]).decode())
        self.pages.add(page)
        self._node_wanted.set()
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._from_page(page, msg.data)
        finally:
            self.pages.discard(page)
            page.writer.cancel()
        return ws

    async def _write(self, page: Page) -> None:
        try:
            while True:
                await page.ws.send_str(await page.queue.get())
        except (ConnectionError, RuntimeError):  # closed under us; the reader ends too
            pass

    async def _from_page(self, page: Page, data: str) -> None:
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            msg = None
        if not isinstance(msg, dict) or msg.get("t") != "command":
            page.send(orjson.dumps([{"t": "ack", "id": None, "ok": False, "error": "not understood"}]).decode())
            return
        error = await self._command(page, msg)
        ack = {"t": "ack", "id": msg.get("id") if isinstance(msg.get("id"), int) else None, "ok": error is None}
        if error:
            ack["error"] = error
        page.send(orjson.dumps([ack]).decode())

    async def _command(self, page: Page, msg: dict) -> str | None:
        """Send a page's command; None once the broker has it, else why not."""
        if self.password is not None and not self.sessions.check(page.token):
            self._close(page, "session ended: log in again")
            return "your session has ended: log in again"
        try:
            device, name, payload = self.board.command(msg, f"via dashboard by {page.user} from {page.peer}")
        except M.BadCommand as e:
            self.log.warning("command refused", user=page.user, peer=page.peer, error=str(e))
            return str(e)
        if not self.mqtt.connected:
            self.log.warning("command not sent: broker not connected", device=device, command=name,
                             user=page.user, peer=page.peer)
            return "not connected to the broker"
        info = self.mqtt.publish(M.command_topic("dashboard", device), payload, qos=1)
        self.commands += 1
        extra = {"sensor": msg.get("sensor"), "value": msg.get("value")} if name == "setpoint" else {}
        self.log.info("command", device=device, command=name, user=page.user, peer=page.peer, **extra)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            return f"not sent: {paho.error_string(info.rc)}"
        fut = self.loop.create_future()
        self._acks[info.mid] = fut
        try:
            await asyncio.wait_for(fut, ACK_TIMEOUT)
        except TimeoutError:
            return f"no PUBACK from the broker within {ACK_TIMEOUT:g}s"
        finally:
            self._acks.pop(info.mid, None)
        return None

    # --- start and stop -------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> None:
        app = web.Application(middlewares=[self._guard], client_max_size=4096)
        app.router.add_get("/", self.index)
        app.router.add_get("/ping", self.ping)
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/login", self.login_form)
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)
        app.router.add_static("/static/", STATIC)
        app.on_response_prepare.append(self._headers)
        app.on_shutdown.append(self._shutdown_pages)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=3.0)
        await self.runner.setup()
        try:
            await web.TCPSite(self.runner, host, port).start()
        except OSError as e:
            await self.runner.cleanup()
            raise Exit(service.EX_OSERR, f"cannot listen on {host}:{port}: "
                                         f"{os.strerror(e.errno) if e.errno else e}") from None
        self._spawn(self._flusher())
        self._spawn(self._node_poller())

    async def _shutdown_pages(self, app: web.Application) -> None:
        for page in list(self.pages):
            await page.ws.close(code=WSCloseCode.GOING_AWAY, message=b"dashboard stopping")

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.runner.cleanup()
        self.mqtt.stop()


def check_access(cfg) -> str | None:
    """The password, or None on loopback without one; a ConfigError (exit 78) for an address
    beyond loopback without a password file."""
    fc = cfg.factory
    if fc.dashboard_password_file is not None:
        return auth.read_password(fc.dashboard_password_file, cfg.origin("[factory] dashboard_password_file"))
    if not auth.is_loopback(fc.dashboard_host):
        raise ConfigError(cfg.origin("[factory] dashboard_host"), "[factory] dashboard_host",
                          f"{fc.dashboard_host!r} is beyond loopback and dashboard_password_file is not set "
                          "(the dashboard can stop machines: beyond loopback it asks for a password)")
    return None


async def serve(svc: Service) -> None:
    fc = svc.config.factory
    password = check_access(svc.config)
    dash = Dashboard(svc, password)
    await dash.start(fc.dashboard_host, fc.dashboard_port)
    endpoint = None
    try:
        dash.mqtt.start()
        svc.status_fn = dash.summary
        endpoint = metrics.serve(svc.log, fc.metrics, "[factory] metrics", dash.families,
                                 index=METRICS_OFFSET["dashboard"], loop=asyncio.get_running_loop())
        svc.ready(f"http://{fc.dashboard_host}:{fc.dashboard_port}/ "
                  + ("with a password" if password else "(loopback, no password)"))
        await svc.stopped()
    finally:
        if endpoint is not None:
            endpoint.close()
        await dash.stop()
