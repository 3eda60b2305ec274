"""The test vectors of docs/PROTOCOL.md ("Ingest test vectors"), computed here from the
specification's words with the primitives alone, checked against our senders, and fed through
the Verifier. The block in the document must equal what this file renders, so it cannot rot:
`IOT_WRITE_VECTORS=1 .venv/bin/pytest tests/unit/test_ingest_vectors.py` writes it after a
deliberate change. RSA-PSS is randomized: the document keeps one valid signature, which is
checked (salt length 32, as senders use), and made anew only if it no longer verifies."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from daemons.ingest.keys import Kind, SenderKey, parse_keys, parse_line
from daemons.ingest.signing import Verifier, make_sender
from tests.support import ROOT

DOC = ROOT / "docs" / "PROTOCOL.md"
BEGIN = "<!-- ingest vectors: begin; written and checked by tests/unit/test_ingest_vectors.py -->"
END = "<!-- ingest vectors: end -->"

BODY = b'{"id":"vec-1","sensor":"line1/temp","ts":1700000000.5,"values":{"temp":21.5,"door":false}}'
HMAC_SECRET = bytes(range(32))
ED_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")  # RFC 8032, test 1
ED_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
AES_KEY = bytes(range(0x40, 0x60))
NONCE_1 = bytes.fromhex("000102030405060708090a0b")
NONCE_2 = bytes.fromhex("f0e1d2c3b4a5968778695a4b")
RSA_PKCS8 = (
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCxPAjejVOX/1FZVwBCP3nioFDr0eWGYPuBqZzhyZiiI6U9qwIA"
    "fUmUEoCuCzRKsi6gGaE2oRnXk6NMbMSJ6QnXBizqJngucntXpP5v7SlQA1TT3hnGlqi+0Hm5ahIpA6ca7QUOBOHkoBdVnhsp2aaI"
    "6U53Ynz0ctM8XBP0u6/YC/acsH6K+8ATxGxn4EPM/nAUtQKWHp2atAMjhrIfHz2HbeG0UC/XTxRVXLqLJ3ur8/xeGaU0n5sr86V1"
    "1gJnu3n1QKKdCW+tr73UZkol/D2dIadaPL8FXmZdf3bHlVoQOP1HnYyzupp/ng8jtnxBBoH1l9GrZ55/C1YkSeFrXmYDAgMBAAEC"
    "ggEAVOA0OyghJURfF9LDS/aMD0zJE/Xj3lOpfnHUsIhTsSoy4vJ3NfbJ+sBVoYO6Gh90lrVPcBL8hjGs3VelU4onbTMG5Wdg3JV0"
    "ngdk1gMUar39rKzLWUAjNaYu9O1oHv4h05I4fns2Fr/YDOd3iLYzu5NHQYMH5iTrJhfOcsBDOMnMesGhczEWcqfMOAGYHIPn/I9K"
    "RhWCPGeQSYlmub9f5XU+Po8Wp/CkGzHQRVhc2fOGRf1g4U5eiOP4cFsTJwqGqH9tIzWBkxxMWffBlmMIYHgpasdhLPxr7nKXXIpe"
    "E8ygCURml+XMyL7pgk/kINKdmg7/BcLlkMr7UPRrmTTdoQKBgQDvYLwEpbyRQ735a49S43yFqM/dWTNfukdS6D56f7ESpwTmCvR7"
    "znKPfsmuwbb+NuLlfLbTAzdfU4oAwD55oyhN9DzyJ6ApAlbeDhknPektAo1UVlwnVeJAkqEHs9SEIC1SjN50yEYczEXyifDK9JH8"
    "hVBglDmkICvFuSzoF4FM0QKBgQC9ip4vH7ffjjCg+ZwScZYsSqub6FwJ+dOMNeKGV6yq4c3DJRwix1w0WTz9B62yYkuDshJMbs0T"
    "vp3q2tb1A+xFSiv2UwRe2V5gTG4kahR+hTAejzqm1ngq9O3V3hvDIo3/PALiq4LPCQy9vFZbebxF18zBVriwcsmjSy59enUqkwKB"
    "gAlKyAGmLVu2NXmpIzckfYDyvJ7rB4N/x6UAPuyiaE1BDn+fjT4BFZFcapfODTxxBP3DiZVHWq7on0LIM6SlILtl77e2shDldlnI"
    "UlGjpZmJr9LGR21/d/jpuDaEVIuMdDXwIfKGk7Iqe8yebipys/gJdMVK+7HTTd+vAH9B6lMBAoGAPp+O9fjf0n/zNyxhUYKv4EBn"
    "hKJ3zl/5cijXiBVtmiPyzNf0/NSrdSxKxzsDO53YX1G1VAWDwlNHb7IQNXGvXZFNBxyUpBXjZaO6/FMEJG0y4dXmxfq0R1UXQ4MX"
    "3xgKnFqihWuvU2IlEIcqbRzChLzxDKvvZ3T1g/syCAkurvsCgYEA7ZDHo0Y48Q/lTeC5tUjN5Xgr9s9HphccEXSD/NRYDd91npbb"
    "SDrB5NFMlsA3+kQhYVqZkJ1YWjsL1b/cfU4HDwCiTEQwIB8GgeIOWk/zbCNUKQzKWVhmlG81eUPHAE5uAljfBWw7RH8poeBxig50"
    "6Fk9jxXR1n7F2wbgoir/jIA="
)


def b64url(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def b64(der: bytes) -> str:
    return base64.b64encode(der).decode()


def _der(key, private: bool) -> bytes:
    if private:
        return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _seal(nonce: bytes, plaintext: bytes) -> tuple[bytes, bytes]:
    header = b"aes1 dev-a " + b64url(nonce)
    return header, AESGCM(AES_KEY).encrypt(nonce, plaintext, header + b"\n")


def _rsa_header(rsa_key, doc: dict[str, str]) -> bytes:
    """The document's rsa1 header if its signature still verifies with salt length 32, else a new one."""
    signed = b"rsa1 dev-r\n" + BODY
    pss32 = padding.PSS(padding.MGF1(hashes.SHA256()), 32)
    old = doc.get("rsa1.header", "").encode()
    if old.startswith(b"rsa1 dev-r "):
        try:
            sig = base64.urlsafe_b64decode(old.rsplit(b" ", 1)[1] + b"==")
            rsa_key.public_key().verify(sig, signed, pss32, hashes.SHA256())
            return old
        except (InvalidSignature, ValueError):
            pass
    return b"rsa1 dev-r " + b64url(rsa_key.sign(signed, pss32, hashes.SHA256()))


def render(doc: dict[str, str]) -> dict[str, str]:
    """Every vector, computed from the specification with the primitives alone."""
    ed = ed25519.Ed25519PrivateKey.from_private_bytes(ED_SEED)
    rsa_key = serialization.load_der_private_key(base64.b64decode("".join(RSA_PKCS8)), None)
    ed1 = b"ed1 dev-e " + b64url(ed.sign(b"ed1 dev-e\n" + BODY))
    aes1, ct1 = _seal(NONCE_1, BODY)
    aes1_ed1, ct2 = _seal(NONCE_2, ed1 + b"\n" + BODY)
    return {
        "body": BODY.decode(),
        "hmac.line": f"dev-h hmac {HMAC_SECRET.hex()}",
        "s1.header": "s1 dev-h " + b64url(hmac.new(HMAC_SECRET, b"s1 dev-h\n" + BODY, hashlib.sha256).digest()).decode(),
        "ed25519.seed": ED_SEED.hex(),
        "ed25519.public": ed.public_key().public_bytes(serialization.Encoding.Raw,
                                                       serialization.PublicFormat.Raw).hex(),
        "ed25519.line": f"dev-e ed25519 {b64(_der(ed.public_key(), False))}",
        "ed25519.sender": f"dev-e ed25519 {b64(_der(ed, True))}",
        "ed1.header": ed1.decode(),
        "rsa.line": f"dev-r rsa {b64(_der(rsa_key.public_key(), False))}",
        "rsa.sender": f"dev-r rsa {b64(_der(rsa_key, True))}",
        "rsa1.header": _rsa_header(rsa_key, doc).decode(),
        "aes.line": f"dev-a aes {AES_KEY.hex()}",
        "aes1.nonce": NONCE_1.hex(),
        "aes1.header": aes1.decode(),
        "aes1.ciphertext": ct1.hex(),
        "aes1-ed1.nonce": NONCE_2.hex(),
        "aes1-ed1.header": aes1_ed1.decode(),
        "aes1-ed1.ciphertext": ct2.hex(),
    }


def block(vectors: dict[str, str]) -> str:
    width = max(map(len, vectors))
    return "```text\n" + "".join(f"{k:<{width}} = {v}\n" for k, v in vectors.items()) + "```"


def read_doc() -> tuple[str, str]:
    text = DOC.read_text()
    m = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), text, re.S)
    assert m, f"{DOC} lacks the ingest vectors block between {BEGIN!r} and {END!r}"
    return text, m.group(1)


def parse_block(b: str) -> dict[str, str]:
    return {k.strip(): v for k, _, v in (ln.partition(" = ") for ln in b.splitlines()) if v}


@pytest.fixture(scope="module")
def doc_vectors() -> dict[str, str]:
    text, current = read_doc()
    want = block(render(parse_block(current)))
    if os.environ.get("IOT_WRITE_VECTORS") and want != current:
        DOC.write_text(text.replace(BEGIN + "\n" + current + "\n", BEGIN + "\n" + want + "\n"))
        current = want
    assert current == want, "docs/PROTOCOL.md's vectors differ from the specification (IOT_WRITE_VECTORS=1 rewrites)"
    return parse_block(current)


def payloads(v: dict[str, str]) -> dict[str, bytes]:
    body = v["body"].encode()
    return {
        "s1": v["s1.header"].encode() + b"\n" + body,
        "ed1": v["ed1.header"].encode() + b"\n" + body,
        "rsa1": v["rsa1.header"].encode() + b"\n" + body,
        "aes1": v["aes1.header"].encode() + b"\n" + bytes.fromhex(v["aes1.ciphertext"]),
        "aes1-ed1": v["aes1-ed1.header"].encode() + b"\n" + bytes.fromhex(v["aes1-ed1.ciphertext"]),
    }


def test_every_vector_verifies_with_the_keys_file_lines_given(doc_vectors):
    keys = parse_keys("\n".join(doc_vectors[f"{k}.line"] for k in ("hmac", "ed25519", "rsa", "aes")), "doc")
    v = Verifier(keys, 65536)
    got = {name: v.check(p) for name, p in payloads(doc_vectors).items()}
    assert {n: (r.msg_id, r.key_id) for n, r in got.items()} == {
        "s1": ("vec-1", "dev-h"), "ed1": ("vec-1", "dev-e"), "rsa1": ("vec-1", "dev-r"),
        "aes1": ("vec-1", "dev-a"), "aes1-ed1": ("vec-1", "dev-e")}


def test_our_senders_write_the_deterministic_vectors(doc_vectors):
    p = payloads(doc_vectors)

    def sender(name: str) -> SenderKey:
        kid, entry = parse_line(doc_vectors[name], "doc", private=True)
        return SenderKey(kid, Kind(doc_vectors[name].split()[1]), entry)

    assert make_sender([sender("hmac.line")])(BODY) == p["s1"]
    assert make_sender([sender("ed25519.sender")])(BODY) == p["ed1"]  # Ed25519 is deterministic
    aes = make_sender([sender("ed25519.sender"), sender("aes.line")])(BODY)  # random nonce: decrypt to compare
    header, ct = aes.split(b"\n", 1)
    nonce = base64.urlsafe_b64decode(header.rsplit(b" ", 1)[1] + b"==")
    assert AESGCM(AES_KEY).decrypt(nonce, ct, header + b"\n") == p["ed1"]


def test_the_ed25519_seed_is_the_tail_of_the_sender_key_der(doc_vectors):
    """PROTOCOL.md tells device authors the raw seed is the last 32 bytes of the PKCS#8 DER."""
    der = base64.b64decode(doc_vectors["ed25519.sender"].split()[2])
    assert der[-32:].hex() == doc_vectors["ed25519.seed"] and len(der) == 48
    assert doc_vectors["ed25519.public"] == ED_PUBLIC.hex()  # RFC 8032's public key for that seed
