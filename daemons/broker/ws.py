"""MQTT over WebSocket (section 6): a server.Connection whose bytes pass through the sans-IO
`websockets` ServerProtocol. Its own module so that a broker without a WebSocket listener
does not import websockets (server.Server.listen imports this one when a listener asks)."""

from __future__ import annotations

import asyncio

from websockets.exceptions import InvalidMessage
from websockets.frames import CloseCode, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from ..config import ListenerConfig
from . import trace
from .server import READ_BUFFER, Connection, PacketTrace, Server

# MQTT over WebSocket: the subprotocols accepted, in order of preference [MQTT-6.0.0-3];
# "mqttv3.1" is what MQTT 3.1 clients ask for.
WS_SUBPROTOCOLS = ("mqtt", "mqttv3.1")
# A WebSocket frame is buffered whole before its bytes reach the MQTT reader: at most one
# largest packet (max_packet_size plus its fixed header) and this much besides.
WS_FRAME_SLACK = 64 * 1024
# So the frame limit does not undo max_connect_size: a WebSocket connection that has sent more
# than max_connect_size plus this (its HTTP request) without a complete CONNECT is closed.
WS_HANDSHAKE_MAX = 64 * 1024


class WsConnection(Connection, asyncio.Protocol):
    """MQTT over WebSocket (section 6): websockets' sans-IO ServerProtocol between the socket
    and the Connection. The opening handshake must offer a subprotocol of WS_SUBPROTOCOLS;
    a refused one gets its HTTP error and a close. Binary frames (and their continuations)
    carry the MQTT byte stream, which goes to the MQTT reader however it is split
    [MQTT-6.0.0-2]; a text frame closes the connection [MQTT-6.0.0-1]. Pings are answered and
    close frames echoed by websockets; its end of stream (SEND_EOF) closes the connection."""

    __slots__ = ("ws", "before_connect")
    trace_accept = False

    def __init__(self, srv: Server, listener: ListenerConfig):
        super().__init__(srv, listener)
        self.ws = ServerProtocol(subprotocols=WS_SUBPROTOCOLS,
                                 max_size=(None, srv.cfg.max_packet_size + 5 + WS_FRAME_SLACK))
        self.before_connect = 0  # bytes received while no CONNECT was accepted

    # asyncio.Protocol as well: uvloop then hands data_received its bytes (websockets copies
    # them into its own buffer anyway); asyncio's loop prefers get_buffer/buffer_updated.
    def get_buffer(self, sizehint: int) -> memoryview:
        return READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(READ_BUFFER[:nbytes]))

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        ws = self.ws
        if self.session is None:
            self.before_connect += len(data)
        ws.receive_data(data)
        mqtt = []
        for event in ws.events_received():
            if isinstance(event, Request):
                response = ws.accept(event)
                ws.send_response(response)
                if response.status_code != 101:
                    self._handshake_refused(response.status_code)
                    break
            elif event.opcode is Opcode.BINARY or event.opcode is Opcode.CONT:
                mqtt.append(event.data)
            elif event.opcode is Opcode.TEXT:
                ws.fail(CloseCode.UNSUPPORTED_DATA, "MQTT over WebSocket takes binary frames only")
                break
        if ws.handshake_exc is not None and not ws.accept_called and not self.closing:
            # Refused before it reached accept(): lines too long (websockets answers 414 or 431)
            # or not an HTTP/1.1 request at all (it closes without a word: we answer 400).
            if isinstance(ws.handshake_exc, InvalidMessage):
                self.transport.write(ws.reject(400, "Failed to open a WebSocket connection: "
                                                    "not an HTTP/1.1 request.\n").serialize())
            self._handshake_refused(400 if isinstance(ws.handshake_exc, InvalidMessage) else "-")
        if mqtt:
            super().data_received(b"".join(mqtt))
        self._ws_out()
        if (self.session is None and not self.closing
                and self.before_connect > self.srv.cfg.max_connect_size + WS_HANDSHAKE_MAX):
            self.broker.limit_hit("connect_size_refused", "WebSocket bytes before CONNECT over max_connect_size; "
                                  "closing connection", peer=self.peer, received=self.before_connect)
            self.close()

    def _handshake_refused(self, status: int | str) -> None:
        exc = self.ws.handshake_exc
        self.srv.log.info("WebSocket handshake refused; closing connection", peer=self.peer, status=status,
                          error=str(exc.__cause__ or exc) if exc else "-")

    def _ws_out(self) -> None:
        """Write what websockets has to send: handshake response, pongs, close frames. Its end
        of stream (the WebSocket is closed, by either side) closes the connection."""
        for chunk in self.ws.data_to_send():
            if chunk:
                if not self.transport.is_closing():
                    self.transport.write(chunk)
            elif not self.closing:
                sent, rcvd = self.ws.close_sent, self.ws.close_rcvd
                if sent is not None and rcvd is None:  # we failed it: a text frame, a bad frame
                    self.srv.log.info("WebSocket error; closing connection", peer=self.peer, client=self.client_id,
                                      code=int(sent.code), reason=sent.reason)
                elif self.trace is not None and rcvd is not None:  # the client closed the WebSocket
                    self.trace.line(trace.closed(PacketTrace.name(self)))
                self.close()

    def _write_parts(self, data: bytes, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._write(data + payload)  # one frame per packet, as every other packet

    def _write(self, data: bytes) -> None:
        if self.ws.state is State.OPEN:
            self.ws.send_binary(data)
            self._ws_out()

    def close(self) -> None:
        if self.closing:
            return
        self.flush()
        if self.ws.state is State.OPEN:
            self.ws.send_close(CloseCode.NORMAL_CLOSURE)
            self._ws_out()
        super().close()
