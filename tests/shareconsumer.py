"""A QoS 1 consumer in its own process, for tests that kill one with -9: it subscribes to the
filter given, prints "ready" once the SUBACK granted it, then one line per message (the payload)
and only then sends the PUBACK, so every line it did not print is a message the broker still
owes someone. Raw socket (tests/mqttraw.py): nothing between the broker and what we see.

    python -m tests.shareconsumer PORT CLIENT_ID FILTER
"""

from __future__ import annotations

import sys

from tests import mqttraw as raw


def main(port: int, client_id: str, topic_filter: str) -> None:
    c = raw.RawClient(port)
    c.connect_ok(client_id)
    c.subscribe_ok([(topic_filter, 1)])
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    while True:
        pkt = c.recv_packet(timeout=3600)
        if pkt.type != raw.PUBLISH:
            continue
        pub = raw.parse_publish(pkt)
        out.write(pub.payload.decode() + "\n")
        out.flush()
        c.send(raw.puback(pub.mid))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
