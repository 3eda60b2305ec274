"""The asymmetric and encrypted ingest formats (ed1, rsa1, aes1) beside s1: keys files, senders'
key files, and every way a message of each kind is accepted or refused."""

from __future__ import annotations

import base64
import multiprocessing
import os

import orjson
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from daemons.ingest import keys as keysmod
from daemons.ingest import signing
from daemons.ingest.keys import Key, KeysError, Kind, SenderKey, load_sender_key, new_key, parse_keys, parse_line
from daemons.ingest.signing import Reason, Rejected, Verifier, encode_body, make_sender

BODY = encode_body("m-1", "s/1", 1_700_000_000.5, {"temp": 21.5, "on": True})


def fresh(kind: Kind, kid: str) -> tuple[SenderKey, str]:
    """(the sender's key, the keys-file line) of a new key."""
    sender_line, node_line = new_key(kind, kid)
    _, entry = parse_line(sender_line, "test", private=True)
    return SenderKey(kid, kind, entry), node_line


SENDERS = {kind: fresh(kind, f"{kind}-1") for kind in Kind}
OTHERS = {kind: fresh(kind, f"{kind}-1") for kind in Kind}  # same ids, other keys
KEYS_TEXT = "\n".join(line for _, line in SENDERS.values())

# Each way to send: the keys used, and the key id the reading is attributed to.
MODES = {
    "hmac": ([Kind.HMAC], "hmac-1"),
    "ed25519": ([Kind.ED25519], "ed25519-1"),
    "rsa": ([Kind.RSA], "rsa-1"),
    "aes": ([Kind.AES], "aes-1"),
    "hmac+aes": ([Kind.HMAC, Kind.AES], "hmac-1"),
    "ed25519+aes": ([Kind.ED25519, Kind.AES], "ed25519-1"),
    "rsa+aes": ([Kind.RSA, Kind.AES], "rsa-1"),
}


def verifier(text: str = KEYS_TEXT, **kw) -> Verifier:
    return Verifier(parse_keys(text, "ingest.keys"), 65536, **kw)


def send(mode: str, body: bytes = BODY, keys: dict | None = None) -> bytes:
    kinds, _ = MODES[mode]
    keys = keys or SENDERS
    return make_sender([keys[k][0] for k in kinds])(body)


def reason(payload: bytes, v: Verifier | None = None) -> Reason:
    with pytest.raises(Rejected) as e:
        (v or verifier()).check(payload)
    return e.value.reason


# -- accepted ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_every_kind_round_trips_and_names_its_key(mode):
    payload = send(mode)
    r = verifier().check(payload)
    assert (r.msg_id, r.values, r.key_id) == ("m-1", {"temp": 21.5, "on": True}, MODES[mode][1])
    tag = b"aes1" if "aes" in mode else {"hmac": b"s1", "ed25519": b"ed1", "rsa": b"rsa1"}[mode]
    assert payload.split(b" ", 1)[0] == tag


def test_encrypted_payload_hides_the_body_and_every_message_gets_its_own_nonce():
    a, b = send("ed25519+aes"), send("ed25519+aes")
    assert b"m-1" not in a and b"temp" not in a
    assert a.split(b"\n", 1)[0] != b.split(b"\n", 1)[0] and a != b


def test_rsa_signature_with_the_maximum_salt_length_verifies_too():
    """Many RSA libraries' examples use the longest salt; PSS lets the verifier recover it."""
    key = SENDERS[Kind.RSA][0].entry.obj
    sig = key.sign(b"rsa1 rsa-1\n" + BODY, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH),
                   hashes.SHA256())
    assert verifier().check(b"rsa1 rsa-1 " + signing.b64url(sig) + b"\n" + BODY).key_id == "rsa-1"


def test_rsa_3072_and_raw_ed25519_public_keys_load():
    big = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    spki = big.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ed = SENDERS[Kind.ED25519][0].entry.obj
    raw = ed.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    text = f"big rsa {base64.b64encode(spki).decode()}\ned-raw ed25519 {base64.b64encode(raw).decode().rstrip('=')}\n"
    v = verifier(text)
    der = big.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    assert v.check(make_sender([SenderKey("big", Kind.RSA, Key(Kind.RSA, der, big))])(BODY)).key_id == "big"
    assert v.check(make_sender([SenderKey("ed-raw", Kind.ED25519, Key(Kind.ED25519, b"", ed))])(BODY)).key_id == "ed-raw"


# -- refused -----------------------------------------------------------------------------------------


def _flip(payload: bytes, at: int) -> bytes:
    return payload[:at] + bytes([payload[at] ^ 0x01]) + payload[at + 1:]


def _sig_char(payload: bytes) -> bytes:
    """The signature's (or nonce's) first character changed to another base64url character."""
    header = payload.split(b"\n", 1)[0]
    at = header.rindex(b" ") + 1
    return payload[:at] + (b"B" if payload[at:at + 1] == b"A" else b"A") + payload[at + 1:]


def _outer(mode: str) -> Reason:
    """How the outermost check fails, by mode."""
    return Reason.BAD_CIPHERTEXT if "aes" in mode else Reason.BAD_SIGNATURE


@pytest.mark.parametrize("mode", MODES)
def test_tampered_body_or_ciphertext(mode):
    payload = send(mode)
    assert reason(_flip(payload, len(payload) - 30)) is _outer(mode)


@pytest.mark.parametrize("mode", MODES)
def test_tampered_signature_gcm_tag_or_nonce(mode):
    payload = send(mode)
    assert reason(_sig_char(payload)) is _outer(mode)  # signature, or aes1's nonce
    if "aes" in mode:
        assert reason(_flip(payload, len(payload) - 1)) is Reason.BAD_CIPHERTEXT  # the GCM tag


@pytest.mark.parametrize("mode", MODES)
def test_wrong_key_under_the_right_id(mode):
    """Signed or encrypted with another key that claims a listed key id."""
    kinds, _ = MODES[mode]
    for k in kinds:  # one key wrong at a time: the outer AES key, or the inner signing key
        keys = {**SENDERS, k: OTHERS[k]}
        expected = Reason.BAD_CIPHERTEXT if k is Kind.AES else Reason.BAD_SIGNATURE
        assert reason(send(mode, keys=keys)) is expected, k


@pytest.mark.parametrize("mode", MODES)
def test_unknown_key_id(mode):
    kinds, _ = MODES[mode]
    for k in kinds:
        text = "\n".join(line for kind, (_, line) in SENDERS.items() if kind is not k)
        assert reason(send(mode), verifier(text)) is Reason.UNKNOWN_KEY, k


@pytest.mark.parametrize("mode", MODES)
def test_key_id_of_another_kind(mode):
    """The keys file names the id with another kind: the tag's algorithm is never tried with it
    (no HMAC with an AES secret, no AES with an HMAC secret)."""
    kinds, _ = MODES[mode]
    for k in kinds:
        other = Kind.AES if k is not Kind.AES else Kind.HMAC
        _, line = fresh(other, f"{k}-1")
        text = "\n".join(ln for kind, (_, ln) in SENDERS.items() if kind is not k) + "\n" + line
        assert reason(send(mode), verifier(text)) is Reason.WRONG_KEY_KIND, k


@pytest.mark.parametrize("mode", MODES)
def test_truncated_at_every_length_is_refused_never_raises_otherwise(mode):
    payload = send(mode)
    v = verifier()
    allowed = {Reason.BAD_ENVELOPE, Reason.BAD_SIGNATURE, Reason.BAD_CIPHERTEXT, Reason.UNKNOWN_KEY,
               Reason.WRONG_KEY_KIND}
    for n in range(len(payload)):
        with pytest.raises(Rejected) as e:
            v.check(payload[:n])
        assert e.value.reason in allowed, (n, e.value)


def test_noncanonical_signature_spelling_is_refused():
    """The last character of an 86-character Ed25519 signature carries 4 unused bits: a decoder
    alone would accept 16 spellings of one signature."""
    payload = send("ed25519")
    header, body = payload.split(b"\n", 1)
    sig = header.rsplit(b" ", 1)[1]
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = sig[:-1] + bytes([alphabet[alphabet.index(sig[-1:]) ^ 1]])
    assert base64.urlsafe_b64decode(twin + b"==") == base64.urlsafe_b64decode(sig + b"==")
    assert reason(header[:-len(sig)] + twin + b"\n" + body) is Reason.BAD_SIGNATURE


def _seal_raw(plaintext: bytes, kid: str = "aes-1", nonce: bytes | None = None) -> bytes:
    """aes1 as PROTOCOL.md writes it, built by hand (a fixed nonce where a test needs one)."""
    nonce = nonce or os.urandom(12)
    header = f"aes1 {kid} ".encode() + signing.b64url(nonce) + b"\n"
    return header + SENDERS[Kind.AES][0].entry.obj.encrypt(nonce, plaintext, header)


@pytest.mark.parametrize("plaintext, expected", [
    (send("ed25519+aes"), Reason.BAD_ENVELOPE),  # aes1 inside aes1
    (b"hello", Reason.BAD_ENVELOPE),
    (b"", Reason.BAD_ENVELOPE),
    (b"xx1 k sig\n{}", Reason.BAD_ENVELOPE),
    (b'{"id": "m"', Reason.BAD_JSON),
    (b'{"id": "m", "sensor": "s", "ts": 1.7e9, "values": {}}', Reason.BAD_SCHEMA),
])
def test_what_aes1_may_hold(plaintext, expected):
    assert reason(_seal_raw(plaintext)) is expected


def test_inner_failure_says_it_was_inside_aes1():
    with pytest.raises(Rejected) as e:
        verifier().check(send("ed25519+aes", keys={**SENDERS, Kind.ED25519: OTHERS[Kind.ED25519]}))
    assert e.value.reason is Reason.BAD_SIGNATURE and "inside aes1 (key 'aes-1')" in e.value.detail


@pytest.mark.parametrize("nonce", [b"", b"short", b"A" * 17, b"AAAAAAAAAAAAAAA=", b"AAAAAAAAAAAAAA+/"])
def test_malformed_nonce_is_a_bad_envelope(nonce):
    good = _seal_raw(BODY)
    header, rest = good.split(b"\n", 1)
    assert reason(header.rsplit(b" ", 1)[0] + b" " + nonce + b"\n" + rest) is Reason.BAD_ENVELOPE


# -- replay and nonces --------------------------------------------------------------------------------


def test_the_same_message_again_passes_and_lands_once_by_its_id():
    """A redelivery (same nonce, same ciphertext) is not a nonce reuse; the database's unique
    message id makes it land once (tests/integration: the worker end to end)."""
    v = verifier()
    payload = send("ed25519+aes")
    assert v.check(payload).msg_id == v.check(payload).msg_id == "m-1"


def test_a_nonce_used_again_for_another_message_is_refused():
    v = verifier()
    nonce = os.urandom(12)
    first = _seal_raw(encode_body("n-1", "s", 1.7e9, {"a": 1}), nonce=nonce)
    second = _seal_raw(encode_body("n-2", "s", 1.7e9, {"a": 2}), nonce=nonce)
    assert v.check(first).msg_id == "n-1"
    with pytest.raises(Rejected) as e:
        v.check(second)
    assert e.value.reason is Reason.NONCE_REUSED and "aes-1" in e.value.detail
    assert v.check(first).msg_id == "n-1"  # the original, redelivered, still passes
    # `iotctl dlq replay` (the operator's decision) does not apply the rule.
    assert verifier(track_nonces=False).check(second).msg_id == "n-2"


def test_a_forged_nonce_is_never_remembered():
    """Only authenticated (nonce, tag) pairs are kept: garbage under a nonce cannot block the
    genuine message that later uses it."""
    v = verifier()
    nonce = os.urandom(12)
    genuine = _seal_raw(BODY, nonce=nonce)
    forged = genuine[:-1] + bytes([genuine[-1] ^ 1])
    assert reason(forged, v) is Reason.BAD_CIPHERTEXT
    assert v.check(genuine).msg_id == "m-1"


def test_a_nonce_of_one_message_on_the_ciphertext_of_another_is_refused():
    a, b = send("aes"), send("aes")
    assert reason(a.split(b"\n", 1)[0] + b"\n" + b.split(b"\n", 1)[1]) is Reason.BAD_CIPHERTEXT


def test_nonce_memory_is_bounded(monkeypatch):
    monkeypatch.setattr(signing, "NONCE_WINDOW", 4)
    v = verifier()
    nonce = os.urandom(12)
    v.check(_seal_raw(encode_body("n-1", "s", 1.7e9, {"a": 1}), nonce=nonce))
    for _ in range(8):  # two generations of 4 later, the first nonce is forgotten
        v.check(send("aes"))
    assert len(v._seen) + len(v._seen_old) <= 8
    assert v.check(_seal_raw(encode_body("n-2", "s", 1.7e9, {"a": 2}), nonce=nonce)).msg_id == "n-2"


def _nonces(seal, n: int, q) -> None:
    q.put([seal(BODY).split(b" ")[2].split(b"\n")[0] for _ in range(n)])


def test_processes_forked_from_one_sender_never_share_a_nonce():
    """`iotctl stress` forks its publishers after loading the key: each draws its own nonces."""
    seal = make_sender([SENDERS[Kind.AES][0]])
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_nonces, args=(seal, 2000, q)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [q.get(timeout=60) for _ in procs] + [[seal(BODY).split(b" ")[2].split(b"\n")[0] for _ in range(2000)]]
    for p in procs:
        p.join(10)
    every = [n for part in got for n in part]
    assert len(set(every)) == len(every) == 6000


# -- keys files -------------------------------------------------------------------------------------------


def test_keys_file_with_every_kind_and_the_old_hmac_line():
    secret = bytes(range(32))
    keys = parse_keys(KEYS_TEXT + f"\nold {secret.hex()}\nnew hmac {secret.hex()}\n")
    assert keys["old"] == keys["new"] == secret  # HMAC secrets stay plain bytes, as before
    assert {k: keysmod.kind_of(e) for k, e in keys.items()} == {
        "hmac-1": Kind.HMAC, "ed25519-1": Kind.ED25519, "rsa-1": Kind.RSA, "aes-1": Kind.AES,
        "old": Kind.HMAC, "new": Kind.HMAC}


def _ed_spki() -> str:
    return SENDERS[Kind.ED25519][1].split()[2]


def _rsa_spki(bits: int = 2048) -> str:
    k = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return base64.b64encode(k.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()


@pytest.mark.parametrize("line, problem", [
    ("k1 dsa AAAA", "kind 'dsa' of 'k1' must be one of hmac, ed25519, rsa, aes"),
    ("k1 aes 00ff", "aes secret of 'k1' must be 64 hex digits"),
    ("k1 aes " + "zz" * 32, "aes secret of 'k1' is not hex"),
    ("k1 hmac 00ff", "shorter than 16 bytes"),
    ("k1 ed25519 not-base64!", "ed25519 public key of 'k1' not base64"),
    ("k1 ed25519 AAAA", "is not a DER SubjectPublicKeyInfo"),
    ("k1 rsa {ed}", "rsa public key of 'k1' is not an rsa key but Ed25519"),
    ("k1 ed25519 {rsa}", "ed25519 public key of 'k1' is not an ed25519 key but RSA"),
    ("k1 rsa {rsa1024}", "has 1024 bits, fewer than 2048"),
    ("k1 ed25519 {private}", "is a PRIVATE key"),
    ("k1 ed25519 AAAA extra", "expected"),
    ("k/1 ed25519 {ed}", "key id 'k/1'"),
])
def test_keys_file_errors_name_file_line_and_problem(line, problem):
    private = SENDERS[Kind.ED25519][0].entry.material
    line = line.format(ed=_ed_spki(), rsa=_rsa_spki() if "{rsa}" in line else "",
                       rsa1024=_rsa_spki(1024) if "rsa1024" in line else "",
                       private=base64.b64encode(private).decode())
    with pytest.raises(KeysError) as e:
        parse_keys(f"# header\n\n{line}\n", "/etc/iot/ingest.keys")
    assert str(e.value).startswith("/etc/iot/ingest.keys:3: ") and problem in str(e.value), str(e.value)


def test_an_id_twice_is_refused_whatever_the_kinds():
    with pytest.raises(KeysError, match=":2: key id 'k1' appears twice"):
        parse_keys(f"k1 {bytes(32).hex()}\nk1 ed25519 {_ed_spki()}\n", "f")


def test_a_keys_file_of_public_keys_only_must_still_be_0600(tmp_path):
    p = tmp_path / "ingest.keys"
    p.write_text(f"ed ed25519 {_ed_spki()}\n")
    os.chmod(p, 0o644)
    with pytest.raises(KeysError, match="chmod 600"):
        keysmod.load_keys(p)
    os.chmod(p, 0o600)
    assert keysmod.kind_of(keysmod.load_keys(p)["ed"]) is Kind.ED25519


@pytest.mark.parametrize("kind", list(Kind))
def test_new_key_sender_file_and_keys_line_work_together(tmp_path, kind):
    sender_line, node_line = new_key(kind, "dev-7")
    path = tmp_path / "dev-7.key"
    keysmod.write_sender_key(path, sender_line, kind)
    assert os.stat(path).st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        keysmod.write_sender_key(path, sender_line, kind)
    sk = load_sender_key(path)
    assert (sk.key_id, sk.kind) == ("dev-7", kind)
    keys = parse_keys(node_line, "ingest.keys")
    if kind in (Kind.ED25519, Kind.RSA):
        assert node_line != sender_line and "PRIVATE" not in node_line
        with pytest.raises(KeysError, match="PRIVATE"):
            parse_keys(sender_line, "ingest.keys")
    assert Verifier(keys, 65536).check(make_sender([sk])(BODY)).key_id == "dev-7"


def test_sender_key_file_is_checked(tmp_path):
    p = tmp_path / "s.key"
    sender_line, node_line = new_key(Kind.ED25519, "s")
    for text, mode, problem in [
        (sender_line, 0o640, "chmod 600"),
        (sender_line + "\n" + sender_line, 0o600, "exactly one key line, holds 2"),
        ("# nothing\n", 0o600, "holds 0"),
        (node_line, 0o600, "not an unencrypted PKCS#8 DER private key"),
    ]:
        p.write_text(text)
        os.chmod(p, mode)
        with pytest.raises(KeysError, match=problem):
            load_sender_key(p)


def test_sender_takes_one_signing_key_and_one_aes_key_at_most():
    with pytest.raises(KeysError, match="one signing key"):
        make_sender([SENDERS[Kind.ED25519][0], SENDERS[Kind.HMAC][0]])
    with pytest.raises(KeysError, match="one signing key"):
        make_sender([])
