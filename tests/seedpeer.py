"""A seed-format sender and receiver written from seed 000's text alone, the way someone
implementing the seed would: JSON messages, chunk data in hex, the five topics, paho-mqtt used
directly. The interop tests run our daemons (`[transfer] wire = "seed-json"`) against it, so
that "speaks the seed's format" is checked against code that is not ours: it imports nothing
from daemons/ and knows nothing of docs/PROTOCOL.md (it ignores fields the seed does not name).

Deliberately naive, as the seed reads: the whole file in memory; every chunk a status lists as
missing is sent again at once, on `retry` ("publish retry chunks, same JSON as chunk"); the
receiver rewrites its state file after every chunk, lists every chunk it lacks in its
status ("periodically / on gap"), and on every start acks each file it has completed (C8). No
pacing beyond a fixed interval between chunks ("publisher can throttle interval"). The file
id is derived from the file's hash, so a restarted sender resends under the same id (C2).
Neither side tolerates a message it cannot parse: an exception in paho's callback ends it.

    python tests/seedpeer.py send FILE [--port P] [--prefix iot] [--chunk-size N] [--interval S]
                                       [--file-id ID] [--reannounce S] [--timeout S]
    python tests/seedpeer.py receive --storage-dir DIR [--port P] [--prefix iot]
                                     [--status-interval S] [--client-id ID]

The sender exits 0 once acknowledged (1 on timeout). Both write one line per event to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mimetypes
import os
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt


def say(who: str, *words) -> None:
    print(who + ":", *words, file=sys.stderr, flush=True)


def make_client(client_id: str, clean_session: bool) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session)
    c.reconnect_delay_set(1, 4)
    return c


# --- sender ---------------------------------------------------------------------------------------


def send(args) -> int:
    path = Path(args.file)
    data = path.read_bytes()
    size, cs = len(data), args.chunk_size
    total = (size + cs - 1) // cs
    chunks = [data[i * cs:(i + 1) * cs] for i in range(total)]
    file_sha256 = hashlib.sha256(data).hexdigest()
    file_id = args.file_id or file_sha256[:16]
    manifest = {"file_id": file_id, "size": size, "chunk_size": cs, "total_chunks": total,
                "file_sha256": file_sha256, "chunk_sha256": [hashlib.sha256(c).hexdigest() for c in chunks],
                "content_type": mimetypes.guess_type(path.name)[0]}
    base = f"{args.prefix}/file/{file_id}"

    def chunk(i: int) -> str:
        return json.dumps({"file_id": file_id, "chunk_index": i, "sha256": manifest["chunk_sha256"][i],
                           "data": chunks[i].hex()})

    acked, subscribed = threading.Event(), threading.Event()
    client = make_client(f"seed-send-{file_id}", True)

    def on_connect(c, userdata, flags, reason_code, properties):
        say("seed-sender", "connected", reason_code)
        c.subscribe([(base + "/status", 1), (base + "/ack", 1)])

    def on_subscribe(c, userdata, mid, reason_codes, properties):
        say("seed-sender", "subscribed")
        subscribed.set()

    def on_message(c, userdata, msg):
        body = json.loads(msg.payload)
        if msg.topic.endswith("/ack"):
            if body["status"] == "ok":
                say("seed-sender", "acked", file_id)
                acked.set()
        elif msg.topic.endswith("/status"):
            for i in body["missing"]:
                c.publish(base + "/retry", chunk(i), qos=1)
            if body["missing"]:
                say("seed-sender", "resent", len(body["missing"]), "chunks")

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect(args.host, args.port, keepalive=5)
    client.loop_start()
    subscribed.wait(args.timeout)
    say("seed-sender", f"id={file_id}", f"chunks={total}", f"size={size}")
    client.publish(base + "/meta", json.dumps(manifest), qos=1)
    for i in range(total):
        client.publish(base + "/chunk", chunk(i), qos=1)
        if args.interval:
            time.sleep(args.interval)
    say("seed-sender", "all chunks published")
    deadline = time.monotonic() + args.timeout
    while not acked.wait(args.reannounce):  # nobody answered: the receiver may have missed the manifest
        if time.monotonic() > deadline:
            say("seed-sender", "no ack; giving up")
            return 1
        client.publish(base + "/meta", json.dumps(manifest), qos=1)
    client.disconnect()
    client.loop_stop()
    return 0


# --- receiver -------------------------------------------------------------------------------------


class Receiver:
    def __init__(self, storage: Path, prefix: str, client: mqtt.Client):
        self.storage, self.prefix, self.client = storage, prefix, client
        self.state_dir = storage / ".state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.files: dict[str, dict] = {}
        for p in self.state_dir.glob("*.json"):  # C1: load state after a restart
            st = json.loads(p.read_text())
            st["received"] = set(st["received"])
            self.files[st["manifest"]["file_id"]] = st
            say("seed-receiver", "loaded", p.stem, f"received={len(st['received'])}", f"complete={st['complete']}")

    def save(self, fid: str) -> None:
        st = self.files[fid]
        tmp = self.state_dir / f"{fid}.json.tmp"
        tmp.write_text(json.dumps({**st, "received": sorted(st["received"])}))
        os.replace(tmp, self.state_dir / f"{fid}.json")

    def part(self, fid: str) -> Path:
        return self.storage / f"{fid}.part"

    def status(self, fid: str) -> None:
        st = self.files[fid]
        total = st["manifest"]["total_chunks"]
        missing = [i for i in range(total) if i not in st["received"]]
        self.client.publish(f"{self.prefix}/file/{fid}/status", json.dumps(
            {"file_id": fid, "received": len(st["received"]), "total": total, "missing": missing,
             "complete": False}), qos=1)

    def ack(self, fid: str) -> None:
        self.client.publish(f"{self.prefix}/file/{fid}/ack",
                            json.dumps({"file_id": fid, "status": "ok", "timestamp": time.time()}), qos=1)
        say("seed-receiver", "ack", fid)

    def on_start(self) -> None:
        with self.lock:
            for fid, st in self.files.items():
                if not st["complete"]:
                    self.status(fid)
                elif hashlib.sha256((self.storage / fid).read_bytes()).hexdigest() == st["manifest"]["file_sha256"]:
                    self.ack(fid)  # C8: the ack may not have left before a crash

    def on_message(self, c, userdata, msg) -> None:
        body = json.loads(msg.payload)
        kind = msg.topic.rsplit("/", 1)[1]
        with self.lock:
            if kind == "meta":
                self.on_meta(body)
            else:
                self.on_chunk(body)

    def on_meta(self, m: dict) -> None:
        fid = m["file_id"]
        if fid in self.files:
            if self.files[fid]["complete"]:
                self.ack(fid)  # C9: the sender came back without having seen the ack
            return
        with open(self.part(fid), "wb") as f:
            f.truncate(m["size"])
        self.files[fid] = {"manifest": m, "received": set(), "complete": False}
        self.save(fid)
        say("seed-receiver", "meta", fid, f"size={m['size']}", f"chunks={m['total_chunks']}")
        self.check_done(fid)

    def on_chunk(self, ch: dict) -> None:
        fid = ch["file_id"]
        st = self.files.get(fid)
        if st is None or st["complete"]:
            return
        m, i = st["manifest"], ch["chunk_index"]
        data = bytes.fromhex(ch["data"])
        if hashlib.sha256(data).hexdigest() != m["chunk_sha256"][i]:
            say("seed-receiver", "bad chunk", fid, i)
            return
        if i in st["received"]:
            return
        gap = i > max(st["received"], default=-1) + 1
        with open(self.part(fid), "r+b") as f:
            f.seek(i * m["chunk_size"])
            f.write(data)
        st["received"].add(i)
        self.save(fid)
        if not self.check_done(fid) and gap:
            self.status(fid)

    def check_done(self, fid: str) -> bool:
        st = self.files[fid]
        m = st["manifest"]
        if len(st["received"]) < m["total_chunks"]:
            return False
        if hashlib.sha256(self.part(fid).read_bytes()).hexdigest() != m["file_sha256"]:
            say("seed-receiver", "file hash mismatch", fid)
            st["received"] = set()
            self.save(fid)
            self.status(fid)
            return True
        os.replace(self.part(fid), self.storage / fid)
        st["complete"] = True
        self.save(fid)
        say("seed-receiver", "complete", fid)
        self.ack(fid)
        return True

    def tick(self) -> None:
        with self.lock:
            for fid, st in self.files.items():
                if not st["complete"]:
                    self.status(fid)


def receive(args) -> int:
    storage = Path(args.storage_dir)
    storage.mkdir(parents=True, exist_ok=True)
    client = make_client(args.client_id, False)
    rx = Receiver(storage, args.prefix, client)
    started = threading.Event()

    def on_connect(c, userdata, flags, reason_code, properties):
        say("seed-receiver", "connected", reason_code)
        c.subscribe([(f"{args.prefix}/file/+/{k}", 1) for k in ("meta", "chunk", "retry")])

    def on_subscribe(c, userdata, mid, reason_codes, properties):
        say("seed-receiver", "subscribed")
        if not started.is_set():
            started.set()
            rx.on_start()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, rx.on_message
    client.connect(args.host, args.port, keepalive=5)
    client.loop_start()
    while True:
        time.sleep(args.status_interval)
        rx.tick()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("send", "receive"):
        p = sub.add_parser(name)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=1883)
        p.add_argument("--prefix", default="iot")
    s = sub.choices["send"]
    s.add_argument("file")
    s.add_argument("--chunk-size", type=int, default=16384)
    s.add_argument("--interval", type=float, default=0.0, help="seconds between two chunks")
    s.add_argument("--file-id", default="")
    s.add_argument("--reannounce", type=float, default=2.0, help="seconds without an ack before meta again")
    s.add_argument("--timeout", type=float, default=60.0)
    r = sub.choices["receive"]
    r.add_argument("--storage-dir", required=True)
    r.add_argument("--status-interval", type=float, default=1.0)
    r.add_argument("--client-id", default="seed-receiver")
    args = ap.parse_args()
    return send(args) if args.cmd == "send" else receive(args)


if __name__ == "__main__":
    sys.exit(main())
