"""Ingest keys: the node's keys file, the senders' key files, and making new keys.

The keys file (etc/iot/ingest.keys) holds what iot-ingest verifies and decrypts with, one key
per line, `#` comments and blank lines ignored:

    <key id> <hex secret>               HMAC-SHA256 secret (the original two-field form)
    <key id> hmac <hex secret>          the same, with its kind spelled out
    <key id> ed25519 <base64 key>       Ed25519 public key: DER SubjectPublicKeyInfo or the raw 32 bytes
    <key id> rsa <base64 key>           RSA public key (>= 2048 bits): DER SubjectPublicKeyInfo
    <key id> aes <64 hex digits>        AES-256-GCM key

Public keys can sign nothing, so a node whose keys file lists only ed25519 and rsa keys holds no
secret that forges a reading. The file as a whole stays mode 0600 all the same: it may hold
HMAC or AES secrets, and one rule is easier to keep than a rule per line.

A sender's key file (`iotctl keys new` writes it, mode 0600, for the sender only) is one line
of the same grammar whose material is what the sender needs: the secret for hmac and aes, the
private key as base64 of its PKCS#8 DER for ed25519 and rsa.

Every line is checked strictly when the file is read (kind, encoding, length, that a public key
is one and of the named type, RSA size), so a bad file stops iot-ingest at start with the file
and line named, never a message later. Loaded key objects are kept in `Key.obj`: parsing a
public key costs far more than using it.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..durable import fsync_dir

KEY_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}")
MIN_SECRET_BYTES = 16
AES_KEY_BYTES = 32  # AES-256 only: one size, nothing to negotiate
MIN_RSA_BITS = 2048
RSA_BITS = (2048, 3072, 4096)


class Kind(StrEnum):
    HMAC = "hmac"
    ED25519 = "ed25519"
    RSA = "rsa"
    AES = "aes"


class KeysError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Key:
    """One key of a kind other than the plain HMAC secret (kept as `bytes`, as it always was).

    `material` is the key as written (DER or secret bytes); `obj` the loaded object that signs,
    verifies or encrypts, made once when the file is read."""

    kind: Kind
    material: bytes
    obj: Any = field(default=None, compare=False, repr=False)


KeyEntry = bytes | Key  # bytes: an HMAC secret


def kind_of(entry: KeyEntry) -> Kind:
    return Kind.HMAC if isinstance(entry, bytes) else entry.kind


# -- parsing -------------------------------------------------------------------------------------


def _b64(text: str) -> bytes:
    """Standard base64, padding optional, nothing else tolerated (b64decode skips junk otherwise)."""
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None


def _secret(text: str, kind: Kind) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError("is not hex") from None
    if kind is Kind.AES and len(key) != AES_KEY_BYTES:
        raise ValueError(f"must be {AES_KEY_BYTES * 2} hex digits (AES-256), got {len(text)}")
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"is shorter than {MIN_SECRET_BYTES} bytes")
    return key


def _is_private(der: bytes) -> bool:
    try:
        serialization.load_der_private_key(der, None)
        return True
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False


def _public(text: str, kind: Kind) -> Key:
    der = _b64(text)
    if kind is Kind.ED25519 and len(der) == 32:
        return Key(kind, der, ed25519.Ed25519PublicKey.from_public_bytes(der))
    try:
        obj = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm):
        if _is_private(der):
            raise ValueError("is a PRIVATE key: the keys file takes the public key only "
                             "(`iotctl keys new` prints the line to add)") from None
        raise ValueError("is not a DER SubjectPublicKeyInfo public key in base64") from None
    want = ed25519.Ed25519PublicKey if kind is Kind.ED25519 else rsa.RSAPublicKey
    if not isinstance(obj, want):
        raise ValueError(f"is not an {kind} key but {type(obj).__name__.removesuffix('PublicKey').lstrip('_')}")
    if kind is Kind.RSA and obj.key_size < MIN_RSA_BITS:
        raise ValueError(f"has {obj.key_size} bits, fewer than {MIN_RSA_BITS}")
    return Key(kind, der, obj)


def _private(text: str, kind: Kind) -> Key:
    try:
        obj = serialization.load_der_private_key(_b64(text), None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("is not an unencrypted PKCS#8 DER private key in base64") from None
    want = ed25519.Ed25519PrivateKey if kind is Kind.ED25519 else rsa.RSAPrivateKey
    if not isinstance(obj, want):
        raise ValueError(f"is not an {kind} private key")
    if kind is Kind.RSA and obj.key_size < MIN_RSA_BITS:
        raise ValueError(f"has {obj.key_size} bits, fewer than {MIN_RSA_BITS}")
    return Key(kind, _b64(text), obj)


def _entry(kind: Kind, material: str, private: bool) -> KeyEntry:
    if kind is Kind.HMAC:
        return _secret(material, kind)
    if kind is Kind.AES:
        key = _secret(material, kind)
        return Key(kind, key, AESGCM(key))
    return _private(material, kind) if private else _public(material, kind)


def parse_line(line: str, where: str, private: bool = False) -> tuple[str, KeyEntry]:
    parts = line.split()
    if len(parts) == 2:
        kid, kind_s, material = parts[0], Kind.HMAC.value, parts[1]
    elif len(parts) == 3:
        kid, kind_s, material = parts
    else:
        raise KeysError(f"{where}: expected '<key id> <hex secret>' or '<key id> <kind> <key>'")
    if not KEY_ID_RE.fullmatch(kid):
        raise KeysError(f"{where}: key id {kid!r} must be 1-32 of A-Z a-z 0-9 _ . -")
    try:
        kind = Kind(kind_s)
    except ValueError:
        raise KeysError(f"{where}: kind {kind_s[:20]!r} of {kid!r} must be one of "
                        f"{', '.join(k.value for k in Kind)}") from None
    try:
        return kid, _entry(kind, material, private)
    except ValueError as e:
        what = "secret" if kind in (Kind.HMAC, Kind.AES) else ("private key" if private else "public key")
        raise KeysError(f"{where}: {kind} {what} of {kid!r} {e}") from None


def parse_keys(text: str, source: str = "keys") -> dict[str, KeyEntry]:
    keys: dict[str, KeyEntry] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        kid, entry = parse_line(line, f"{source}:{n}")
        if kid in keys:
            raise KeysError(f"{source}:{n}: key id {kid!r} appears twice")
        keys[kid] = entry
    return keys


def _read_private(path: Path, what: str, require_private: bool) -> str:
    try:
        st = path.stat()
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise KeysError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    if require_private and stat.S_IMODE(st.st_mode) & 0o077:
        raise KeysError(f"{what} {path} is accessible by group/others (mode {stat.S_IMODE(st.st_mode):04o}); "
                        f"chmod 600 it")
    return text


def load_keys(path: Path, *, require_private: bool = True) -> dict[str, KeyEntry]:
    """Read the keys file. It must not be readable or writable by group or others: a secret that
    every local user can read signs nothing."""
    keys = parse_keys(_read_private(path, "keys file", require_private), str(path))
    if not keys:
        raise KeysError(f"keys file {path} holds no key")
    return keys


@dataclass(frozen=True, slots=True)
class SenderKey:
    """What a sender signs or encrypts with: its key id, kind and secret or private key."""

    key_id: str
    kind: Kind
    entry: KeyEntry


def load_sender_key(path: Path) -> SenderKey:
    """A sender's key file (from `iotctl keys new`): one key line, mode 0600."""
    lines = [(n, ln.strip()) for n, ln in enumerate(_read_private(path, "key file", True).splitlines(), 1)
             if ln.strip() and not ln.strip().startswith("#")]
    if len(lines) != 1:
        raise KeysError(f"key file {path} must hold exactly one key line, holds {len(lines)}")
    n, line = lines[0]
    kid, entry = parse_line(line, f"{path}:{n}", private=True)
    return SenderKey(kid, kind_of(entry), entry)


# -- new keys --------------------------------------------------------------------------------------


def new_secret() -> str:
    return os.urandom(32).hex()


def new_key(kind: Kind, key_id: str, rsa_bits: int = 2048) -> tuple[str, str]:
    """(the sender's key line, the keys-file line) for a fresh key."""
    kind = Kind(kind)
    if not KEY_ID_RE.fullmatch(key_id):
        raise KeysError(f"key id {key_id!r} must be 1-32 of A-Z a-z 0-9 _ . -")
    if kind in (Kind.HMAC, Kind.AES):
        line = f"{key_id} {kind} {new_secret()}"
        return line, line
    if kind is Kind.ED25519:
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        if rsa_bits not in RSA_BITS:
            raise KeysError(f"RSA size must be one of {', '.join(map(str, RSA_BITS))} bits")
        private = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    priv = private.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    pub = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return (f"{key_id} {kind} {base64.b64encode(priv).decode()}",
            f"{key_id} {kind} {base64.b64encode(pub).decode()}")


def write_sender_key(path: Path, line: str, kind: Kind) -> None:
    """Create the sender's key file, mode 0600 from its first byte; never replaces a file."""
    note = ("the secret: copy it to the sender and keep it secret; the node has it too" if kind in
            (Kind.HMAC, Kind.AES) else "the PRIVATE key: it stays on the sender; the node needs only the public key")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, f"# iot-ingest {kind} key, {note}.\n{line}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.resolve().parent)
