"""The signed-payload wire format and the body schema: every way a message is refused."""

import os

import orjson
import pytest

from daemons.ingest import signing
from daemons.ingest.signing import Reason, Rejected, Signer, Verifier, encode_body

K1, K2 = bytes(range(32)), bytes(range(32, 64))


def good(i: int = 1, kid: str = "k1", key: bytes = K1, **over) -> bytes:
    doc = {"id": f"m-{i}", "sensor": "s/1", "ts": 1_700_000_000.5, "values": {"temp": 21.5, "on": True}}
    doc.update(over)
    return Signer(kid, key).sign(orjson.dumps(doc))


def reason(payload: bytes, keys=None, max_payload: int = 65536) -> Reason:
    with pytest.raises(Rejected) as e:
        Verifier(keys or {"k1": K1}, max_payload).check(payload)
    return e.value.reason


def test_round_trip_and_wire_format():
    body = encode_body("m-1", "s/1", 1_700_000_000.25, {"temp": 21.5})
    payload = Signer("k1", K1).sign(body)
    header, body2 = payload.split(b"\n", 1)
    tag, kid, sig = header.split(b" ")
    assert (tag, kid, len(sig), body2) == (b"s1", b"k1", 43, body)
    r = Verifier({"k1": K1}, 65536).check(payload)
    assert (r.msg_id, r.sensor, r.ts, r.values, r.key_id) == ("m-1", "s/1", 1_700_000_000.25, {"temp": 21.5}, "k1")


def test_keys_rotate_both_verify_and_each_signs_for_itself():
    v = Verifier({"k1": K1, "k2": K2}, 65536)
    assert v.check(good(1, "k1", K1)).key_id == "k1"
    assert v.check(good(2, "k2", K2)).key_id == "k2"
    # Signed with k2's secret but claiming k1: the key id is bound into the MAC.
    assert reason(good(3, "k1", K2), {"k1": K1, "k2": K2}) is Reason.BAD_SIGNATURE


@pytest.mark.parametrize("mutate, expected", [
    (lambda p: p[:-2] + b"9}", Reason.BAD_SIGNATURE),          # body tampered
    (lambda p: p.replace(b"s1 k1", b"s1 k9"), Reason.UNKNOWN_KEY),
    (lambda p: p.split(b"\n", 1)[1], Reason.BAD_ENVELOPE),       # unsigned JSON
    (lambda p: b"s2" + p[2:], Reason.BAD_ENVELOPE),              # unknown format version
    (lambda p: b"", Reason.BAD_ENVELOPE),
    (lambda p: b"\xff\xfe binary \x00", Reason.BAD_ENVELOPE),
])
def test_envelope_and_signature_failures(mutate, expected):
    assert reason(mutate(good())) is expected


def test_oversized_is_refused_before_anything_else():
    assert reason(good() + b" " * 70000) is Reason.OVERSIZED
    assert reason(good(), max_payload=50) is Reason.OVERSIZED


def signed(body: bytes) -> bytes:
    return Signer("k1", K1).sign(body)


@pytest.mark.parametrize("body, expected", [
    (b'{"id": "m", "sensor": "s", "ts": 1.7e9, "values": {"a": 1}', Reason.BAD_JSON),
    (b"not json", Reason.BAD_JSON),
    (b"[1, 2]", Reason.BAD_SCHEMA),
    (b'{"sensor": "s", "ts": 1.7e9, "values": {"a": 1}}', Reason.BAD_SCHEMA),
    (b'{"id": "m", "sensor": "s", "ts": 1.7e9, "values": {"a": 1}, "extra": 1}', Reason.BAD_SCHEMA),
    (b'{"id": 5, "sensor": "s", "ts": 1.7e9, "values": {"a": 1}}', Reason.BAD_SCHEMA),
    (b'{"id": "m m", "sensor": "s", "ts": 1.7e9, "values": {"a": 1}}', Reason.BAD_SCHEMA),
    (b'{"id": "' + b"x" * 65 + b'", "sensor": "s", "ts": 1.7e9, "values": {"a": 1}}', Reason.BAD_SCHEMA),
    (b'{"id": "m", "sensor": "", "ts": 1.7e9, "values": {"a": 1}}', Reason.BAD_SCHEMA),
    (b'{"id": "m", "sensor": "s", "ts": "1700000000", "values": {"a": 1}}', Reason.BAD_SCHEMA),
    (b'{"id": "m", "sensor": "s", "ts": true, "values": {"a": 1}}', Reason.BAD_SCHEMA),
    (b'{"id": "m", "sensor": "s", "ts": 12, "values": {"a": 1}}', Reason.BAD_SCHEMA),
    (b'{"id": "m", "sensor": "s", "ts": 1.7e9, "values": {}}', Reason.BAD_SCHEMA),
    (b'{"id": "m", "sensor": "s", "ts": 1.7e9, "values": [1]}', Reason.BAD_SCHEMA),
    (b'{"id": "m", "sensor": "s", "ts": 1.7e9, "values": {"a": "21.5"}}', Reason.BAD_SCHEMA),
    (b'{"id": "m", "sensor": "s", "ts": 1.7e9, "values": {"a": null}}', Reason.BAD_SCHEMA),
    (b'{"id": "m", "sensor": "s", "ts": 1.7e9, "values": {"a": {"b": 1}}}', Reason.BAD_SCHEMA),
    (b'{"id": "m", "sensor": "s", "ts": 1.7e9, "values": {"' + b"n" * 65 + b'": 1}}', Reason.BAD_SCHEMA),
    (b'{"id": "m", "sensor": "s", "ts": 1.7e9, "values": {"a": 1e400}}', Reason.BAD_JSON),
])
def test_schema_failures(body, expected):
    assert reason(signed(body)) is expected


def test_integer_timestamp_and_boolean_values_are_accepted():
    r = Verifier({"k1": K1}, 65536).check(signed(b'{"id":"m","sensor":"s","ts":1700000000,"values":{"a":false}}'))
    assert r.ts == 1_700_000_000.0 and isinstance(r.ts, float) and r.values == {"a": False}


def test_keys_file_format_and_permissions(tmp_path):
    p = tmp_path / "ingest.keys"
    p.write_text(f"# comment\n\nk1 {K1.hex()}\nk2 {K2.hex()}\n")
    os.chmod(p, 0o600)
    assert signing.load_keys(p) == {"k1": K1, "k2": K2}
    os.chmod(p, 0o644)
    with pytest.raises(signing.KeysError, match="chmod 600"):
        signing.load_keys(p)


@pytest.mark.parametrize("text, problem", [
    ("k1\n", "expected"),
    ("k1 zz\n", "not hex"),
    ("k1 00ff\n", "shorter"),
    (f"bad/id {K1.hex()}\n", "key id"),
    (f"k1 {K1.hex()}\nk1 {K2.hex()}\n", "twice"),
])
def test_keys_file_errors_name_the_line(text, problem):
    with pytest.raises(signing.KeysError, match=problem):
        signing.parse_keys(text, "f")


def test_shipped_sample_keys_file_parses():
    from tests.support import ROOT

    keys = signing.parse_keys((ROOT / "etc" / "iot" / "ingest.keys").read_text())
    assert keys and all(len(k) >= 16 for k in keys.values())
