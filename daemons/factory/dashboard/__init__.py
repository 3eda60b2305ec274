"""iot-dashboard: the factory and the node in a web page, live (seed 003's dashboard).

Theory of operation
===================

One process: an aiohttp server on [factory] dashboard_host:dashboard_port (127.0.0.1:8080) and
an MQTT client (client id "dashboard", user [factory] dashboard_username; etc/iot/acl lets it
read factory/# and $SYS/# and write factory/commands/dashboard/#).

* board.py keeps what the page shows, bounded: each device's retained status and state, the
  last values of each sensor for its chart, recent alarms, recent traffic, $SYS values.
* server.py pushes the board's changes to every open page over a WebSocket, a snapshot first;
  the page's commands go to factory/commands/dashboard/<device> at QoS 1, logged with who
  sent them.
* node.py reads the Node view's figures (daemons, transfers, ingest, DLQ) from where iotctl
  reads them, in a thread, while a page is open.
* auth.py: loopback only without a password; with [factory] dashboard_password_file a login
  form, a session cookie, and Origin checks.
* static/: the page (plain HTML, CSS and JavaScript) and uPlot for the charts, served from
  here: nothing is fetched from another site.
"""

from __future__ import annotations

import sys

from ... import service


def main(argv=None) -> int:
    from .server import serve  # noqa: PLC0415 - aiohttp only in the daemon, not in importers of board/auth

    return service.run(
        "iot-dashboard",
        "The factory's devices, alarms, traffic and commands, and this node's daemons, in a web page "
        "([factory] dashboard_host:dashboard_port, 127.0.0.1:8080 by default).",
        serve, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
