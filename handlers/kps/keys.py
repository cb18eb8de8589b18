"""SSH key formats, pure: bytes or text in, keys and text out (no I/O).

Public keys: OpenSSH one-line (``ssh-ed25519 AAAA... comment``), RFC 4716
(``---- BEGIN SSH2 PUBLIC KEY ----``, what PuTTYgen's "Save public key" writes),
PEM SubjectPublicKeyInfo / PKCS#1, and X.509 PEM certificates. Every form is
normalised to the OpenSSH wire blob, whose SHA-256 is the fingerprint exactly
as ``ssh-keygen -lf`` prints it.

Private keys: OpenSSH, PEM (PKCS#8 or traditional) and PuTTY ``.ppk`` (read
versions 2 and 3, write version 3). The PuTTY format is implemented here after
Appendix C of the PuTTY manual because neither ``cryptography`` nor asyncssh
reads it.

Errors are :class:`engine.errors.InvalidInput` with the product's messages;
a key's bytes never appear in an error.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from engine.errors import InvalidInput

PrivateKey = (
    ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    | dsa.DSAPrivateKey
)

INVALID_PARAMETER = "Invalid parameter."
INVALID_TYPE = "Invalid key pair type."
MISMATCH = "The imported private key does not match the public key."

# Algorithms a key pair can be created with, and the OpenSSH key type of each.
CREATE_ALGORITHMS: dict[str, tuple[str, int]] = {
    "SSH_ED25519": ("ssh-ed25519", 256),
    "ECDSA_NISTP256": ("ecdsa-sha2-nistp256", 256),
    "ECDSA_NISTP384": ("ecdsa-sha2-nistp384", 384),
    "ECDSA_NISTP521": ("ecdsa-sha2-nistp521", 521),
    "SSH_RSA_2048": ("ssh-rsa", 2048),
    "SSH_RSA_3072": ("ssh-rsa", 3072),
    "SSH_RSA_4096": ("ssh-rsa", 4096),
}
CURVES: dict[str, tuple[str, type[ec.EllipticCurve]]] = {
    "ecdsa-sha2-nistp256": ("nistp256", ec.SECP256R1),
    "ecdsa-sha2-nistp384": ("nistp384", ec.SECP384R1),
    "ecdsa-sha2-nistp521": ("nistp521", ec.SECP521R1),
}
CURVE_ORDERS = {
    "ecdsa-sha2-nistp256":
        0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "ecdsa-sha2-nistp384": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196A"
        "CCC52973", 16),
    "ecdsa-sha2-nistp521": int(
        "01FF" + "FFFFFFFF" * 7 + "FFFFFFFA51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AE"
        "BB6FB71E91386409", 16),
}
KEYGEN_NAMES = {"ssh-ed25519": "ED25519", "ssh-rsa": "RSA", "ssh-dss": "DSA"}
KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ssh-dss", *CURVES)
MIN_RSA_BITS = 2048
PRIVATE_FORMATS = ("openssh", "pem", "pkcs8", "ppk")


def _bad(message: str = INVALID_PARAMETER, cause: str = "", fix: str = "") -> InvalidInput:
    return InvalidInput(message, cause=cause, fix=fix or "Check the call.")


# --------------------------------------------------------------------- SSH wire format


class _Reader:
    """RFC 4251 data types from a byte string."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def uint32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise ValueError("truncated")
        (value,) = struct.unpack(">I", self.data[self.pos:self.pos + 4])
        self.pos += 4
        return int(value)

    def string(self) -> bytes:
        n = self.uint32()
        if self.pos + n > len(self.data):
            raise ValueError("truncated")
        value = self.data[self.pos:self.pos + n]
        self.pos += n
        return value

    def mpint(self) -> int:
        return int.from_bytes(self.string(), "big", signed=True)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ValueError("trailing bytes")


def _string(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _mpint(value: int) -> bytes:
    if value == 0:
        return _string(b"")
    raw = value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)
    return _string(raw)


# --------------------------------------------------------------------- public keys


@dataclass(frozen=True)
class PublicKey:
    """A public key as OpenSSH sees it: its type, wire blob and comment."""

    key_type: str
    blob: bytes
    bits: int
    comment: str = ""

    @property
    def algorithm(self) -> str:
        """Our algorithm name (``SSH_ED25519``, ``ECDSA_NISTP256``, ``SSH_RSA_3072``...)."""
        if self.key_type == "ssh-ed25519":
            return "SSH_ED25519"
        if self.key_type == "ssh-dss":
            return "SSH_DSS"
        if self.key_type == "ssh-rsa":
            return f"SSH_RSA_{self.bits}"
        return "ECDSA_" + CURVES[self.key_type][0].upper()

    @property
    def fingerprint(self) -> str:
        """``SHA256:<base64 without padding>``, as ``ssh-keygen -lf`` prints it."""
        digest = hashlib.sha256(self.blob).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    @property
    def md5_fingerprint(self) -> str:
        digest = hashlib.md5(self.blob, usedforsecurity=False).hexdigest()
        return "MD5:" + ":".join(digest[i:i + 2] for i in range(0, 32, 2))

    def openssh(self, comment: str | None = None) -> str:
        """The one-line form for ``authorized_keys`` (no trailing newline)."""
        text = f"{self.key_type} {base64.b64encode(self.blob).decode()}"
        note = self.comment if comment is None else comment
        return f"{text} {note}" if note else text

    def keygen_line(self) -> str:
        """What ``ssh-keygen -lf`` prints for this key's ``.pub`` file."""
        name = KEYGEN_NAMES.get(self.key_type, "ECDSA")
        return f"{self.bits} {self.fingerprint} {self.comment or 'no comment'} ({name})"

    def with_comment(self, comment: str) -> PublicKey:
        return PublicKey(self.key_type, self.blob, self.bits, comment)


def public_key_from_blob(blob: bytes, comment: str = "") -> PublicKey:
    """Check an OpenSSH wire blob and describe it (InvalidInput if malformed)."""
    try:
        reader = _Reader(blob)
        key_type = reader.string().decode("ascii")
        if key_type == "ssh-ed25519":
            if len(reader.string()) != 32:
                raise ValueError("an Ed25519 key is 32 bytes")
            reader.end()
            return PublicKey(key_type, blob, 256, comment)
        if key_type == "ssh-dss":
            p = reader.mpint()
            for _ in range(3):
                reader.mpint()
            reader.end()
            return PublicKey(key_type, blob, p.bit_length(), comment)
        if key_type not in ("ssh-rsa", *CURVES):
            raise ValueError(f"unsupported key type {key_type[:40]!r}")
        # cryptography validates the numbers (point on the curve, RSA modulus).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = ser.load_ssh_public_key(
                f"{key_type} {base64.b64encode(blob).decode()}".encode())
    except (ValueError, UnicodeDecodeError, UnsupportedAlgorithm) as exc:
        raise _bad(cause=f"not a valid SSH public key: {exc}",
                   fix="Give an OpenSSH, RFC 4716 or PEM public key.") from None
    if isinstance(loaded, rsa.RSAPublicKey):
        if loaded.key_size < MIN_RSA_BITS:
            raise _bad(cause=f"an RSA key of {loaded.key_size} bits is too short",
                       fix=f"Use an RSA key of at least {MIN_RSA_BITS} bits.")
        return PublicKey(key_type, blob, loaded.key_size, comment)
    assert isinstance(loaded, ec.EllipticCurvePublicKey)
    return PublicKey(key_type, blob, loaded.curve.key_size, comment)


def public_key_of(key: PrivateKey, comment: str = "") -> PublicKey:
    """The public half of a private key."""
    line = key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH)
    return public_key_from_blob(base64.b64decode(line.split()[1]), comment)


RFC4716_BEGIN = "---- BEGIN SSH2 PUBLIC KEY ----"
RFC4716_END = "---- END SSH2 PUBLIC KEY ----"


def parse_public_key(text: str, kind: str = "ssh") -> PublicKey:
    """Any accepted public key form, normalised. ``kind`` is ``ssh`` or ``x509``."""
    if kind not in ("ssh", "x509"):
        raise InvalidInput(INVALID_TYPE, code="invalid_keypair_type",
                           cause=f"type {kind[:20]!r} is neither ssh nor x509",
                           fix="Use --type ssh or --type x509.")
    text = text.strip().lstrip("\ufeff")
    if not text:
        raise _bad(cause="the public key is empty")
    if kind == "x509":
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise _bad(cause="an x509 key pair needs a PEM certificate",
                       fix="Give a PEM certificate (-----BEGIN CERTIFICATE-----).")
        try:
            cert = x509.load_pem_x509_certificate(text.encode())
            return _from_crypto_public(cert.public_key(), _cert_comment(cert))
        except ValueError as exc:
            raise _bad(cause=f"not a valid PEM certificate: {exc}") from None
    if text.startswith(RFC4716_BEGIN):
        return _parse_rfc4716(text)
    if text.startswith("-----BEGIN"):
        if "CERTIFICATE" in text.split("\n", 1)[0]:
            raise _bad(cause="a certificate was given for an ssh key pair",
                       fix="Use --type x509 for a certificate.")
        try:
            return _from_crypto_public(ser.load_pem_public_key(text.encode()), "")
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise _bad(cause=f"not a valid PEM public key: {exc}") from None
    return _parse_openssh_line(text)


def _cert_comment(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else ""


def _from_crypto_public(key: object, comment: str) -> PublicKey:
    if not isinstance(key, (ed25519.Ed25519PublicKey, ec.EllipticCurvePublicKey,
                            rsa.RSAPublicKey, dsa.DSAPublicKey)):
        raise _bad(cause=f"{type(key).__name__} keys cannot be SSH keys")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            line = key.public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH)
    except ValueError as exc:  # e.g. an EC curve SSH does not know
        raise _bad(cause=f"this key cannot be an SSH key: {exc}") from None
    return public_key_from_blob(base64.b64decode(line.split()[1]), comment)


def _parse_openssh_line(text: str) -> PublicKey:
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise _bad(cause="an OpenSSH public key is one line",
                   fix="Give one key per key pair.")
    parts = lines[0].split(None, 2)
    if len(parts) < 2 or parts[0] not in KEY_TYPES:
        raise _bad(cause="not an OpenSSH public key line (type, Base64 key, comment)",
                   fix=f"Key types accepted: {', '.join(KEY_TYPES)}.")
    blob = _b64(parts[1])
    key = public_key_from_blob(blob, parts[2].strip() if len(parts) > 2 else "")
    if key.key_type != parts[0]:
        raise _bad(cause=f"the line says {parts[0]} but the key inside is {key.key_type}")
    return key


def _parse_rfc4716(text: str) -> PublicKey:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    if RFC4716_END not in lines:
        raise _bad(cause=f"no {RFC4716_END!r} line")
    body = lines[1:lines.index(RFC4716_END)]
    headers: dict[str, str] = {}
    data: list[str] = []
    i = 0
    while i < len(body):
        line = body[i]
        if ":" in line and not data:
            # A header; a trailing backslash continues it on the next line.
            name, _, value = line.partition(":")
            value = value.strip()
            while value.endswith("\\") and i + 1 < len(body):
                i += 1
                value = value[:-1] + body[i].strip()
            headers[name.strip().lower()] = value
        elif line:
            data.append(line.strip())
        i += 1
    comment = headers.get("comment", "")
    if len(comment) >= 2 and comment[0] == comment[-1] == '"':
        comment = comment[1:-1]
    return public_key_from_blob(_b64("".join(data)), comment)


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(cause="the key is not valid Base64") from None


# --------------------------------------------------------------------- key generation


def generate_private_key(algorithm: str, random_bytes: bytes) -> PrivateKey:
    """A new private key. ``random_bytes`` (at least 96, from the HSM's RNG) seed
    Ed25519 (32 bytes) and the ECDSA scalar (order size + 64 bits, reduced without
    bias); RSA primes come from ``cryptography``'s generator (OpenSSL's RNG), as
    PKCS#11 tokens cannot hand out RSA private keys they generate."""
    if algorithm not in CREATE_ALGORITHMS:
        raise InvalidInput(INVALID_PARAMETER, code="invalid_algorithm",
                           cause=f"unknown algorithm {algorithm[:40]!r}",
                           fix=f"Use one of {', '.join(CREATE_ALGORITHMS)}.")
    key_type, bits = CREATE_ALGORITHMS[algorithm]
    if len(random_bytes) < 96:
        raise ValueError("at least 96 random bytes are needed")
    if key_type == "ssh-ed25519":
        return ed25519.Ed25519PrivateKey.from_private_bytes(random_bytes[:32])
    if key_type in CURVES:
        order = CURVE_ORDERS[key_type]
        scalar = int.from_bytes(random_bytes[: (order.bit_length() + 64 + 7) // 8], "big")
        return ec.derive_private_key(scalar % (order - 1) + 1, CURVES[key_type][1]())
    return rsa.generate_private_key(65537, bits)


# --------------------------------------------------------------------- private keys


@dataclass(frozen=True)
class LoadedPrivateKey:
    key: PrivateKey
    comment: str
    source_format: str


def load_private_key(data: bytes, passphrase: bytes | None = None) -> LoadedPrivateKey:
    """A private key in OpenSSH, PEM (PKCS#8 / traditional) or PuTTY format."""
    text = data.lstrip(b"\xef\xbb\xbf").strip()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if text.startswith(b"PuTTY-User-Key-File-"):
                return _load_ppk(text.decode("utf-8"), passphrase)
            if text.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
                key = ser.load_ssh_private_key(text, passphrase)
                return LoadedPrivateKey(_check_private(key), "", "openssh")
            if text.startswith(b"-----BEGIN"):
                try:
                    loaded: object = ser.load_pem_private_key(text, passphrase)
                except ValueError:
                    # PuTTYgen 0.78 writes some EC scalars without their leading zero
                    # bytes, which OpenSSL reads and cryptography refuses.
                    short = _short_ec_pem(text)
                    if short is None:
                        raise
                    loaded = short
                return LoadedPrivateKey(_check_private(loaded), "", "pem")
    except TypeError as exc:  # cryptography: a passphrase is missing or not needed
        raise _bad(cause=f"passphrase problem: {exc}",
                   fix="Give the key's passphrase (--passphrase-file), or none.") from None
    except (ValueError, UnicodeDecodeError, UnsupportedAlgorithm) as exc:
        raise _bad(cause=f"not a readable private key: {str(exc)[:200]}",
                   fix="Give an OpenSSH, PEM or PuTTY .ppk private key "
                   "(and its passphrase if it has one).") from None
    raise _bad(cause="not an OpenSSH, PEM or PuTTY .ppk private key")


EC_OIDS: dict[bytes, type[ec.EllipticCurve]] = {
    bytes.fromhex("2a8648ce3d030107"): ec.SECP256R1,
    bytes.fromhex("2b81040022"): ec.SECP384R1,
    bytes.fromhex("2b81040023"): ec.SECP521R1,
}


def _der(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """One DER TLV at ``pos``: (tag, value, next position)."""
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        size = length & 0x7F
        length = int.from_bytes(data[pos:pos + size], "big")
        pos += size
    return tag, data[pos:pos + length], pos + length


def _short_ec_pem(text: bytes) -> ec.EllipticCurvePrivateKey | None:
    """An unencrypted SEC1 ``EC PRIVATE KEY`` whose scalar lost its leading zeros."""
    lines = text.decode("ascii", "replace").strip().splitlines()
    if lines[0] != "-----BEGIN EC PRIVATE KEY-----" or any(":" in line for line in lines):
        return None
    try:
        der = base64.b64decode("".join(lines[1:-1]))
        tag, body, _ = _der(der, 0)
        _, _, pos = _der(body, 0)  # version
        _, scalar, pos = _der(body, pos)
        tag, params, pos = _der(body, pos)
        _, oid, _ = _der(params, 0)
    except (IndexError, ValueError, binascii.Error):
        return None
    curve = EC_OIDS.get(oid)
    if curve is None or tag != 0xA0:
        return None
    return ec.derive_private_key(int.from_bytes(scalar, "big"), curve())


def _check_private(key: object) -> PrivateKey:
    if not isinstance(key, (ed25519.Ed25519PrivateKey, ec.EllipticCurvePrivateKey,
                            rsa.RSAPrivateKey, dsa.DSAPrivateKey)):
        raise ValueError(f"{type(key).__name__} keys are not SSH keys")
    if isinstance(key, ec.EllipticCurvePrivateKey) and \
            key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise ValueError(f"the curve {key.curve.name} is not an SSH curve")
    return key


def matches(private: PrivateKey, public: PublicKey) -> bool:
    return public_key_of(private).blob == public.blob


def dump_private_key(
    key: PrivateKey, fmt: str, comment: str = "", passphrase: bytes | None = None
) -> bytes:
    """``key`` as ``openssh``, ``pem`` (traditional where one exists), ``pkcs8`` or ``ppk``
    (version 3); encrypted when a passphrase is given."""
    encryption: ser.KeySerializationEncryption = (
        ser.BestAvailableEncryption(passphrase) if passphrase else ser.NoEncryption())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "openssh":
            return key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, encryption)
        if fmt == "pem" and not isinstance(key, ed25519.Ed25519PrivateKey):
            return key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.TraditionalOpenSSL,
                                     encryption)
        if fmt in ("pem", "pkcs8"):
            return key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, encryption)
        if fmt == "ppk":
            return dump_ppk(key, comment, passphrase).encode("utf-8")
    raise _bad(cause=f"unknown format {fmt[:20]!r}", fix=f"Use {', '.join(PRIVATE_FORMATS)}.")


# --------------------------------------------------------------------- PuTTY .ppk

PPK_V2_MAC_KEY_PREFIX = b"putty-private-key-file-mac-key"
ARGON2_FLAVOURS = ("Argon2d", "Argon2i", "Argon2id")
# PuTTYgen's defaults for a new v3 file.
ARGON2_MEMORY_KIB, ARGON2_PASSES, ARGON2_PARALLELISM = 8192, 13, 1


def _private_blob(key: PrivateKey) -> tuple[str, bytes, bytes]:
    """(key type, public blob, private blob) as PuTTY stores them."""
    public = public_key_of(key)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        private = _string(key.private_bytes_raw())
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        private = _mpint(key.private_numbers().private_value)
    elif isinstance(key, rsa.RSAPrivateKey):
        n = key.private_numbers()
        private = _mpint(n.d) + _mpint(n.p) + _mpint(n.q) + _mpint(n.iqmp)
    else:
        private = _mpint(key.private_numbers().x)
    return public.key_type, public.blob, private


def _ppk_key(key_type: str, public_blob: bytes, private_blob: bytes) -> PrivateKey:
    pub, priv = _Reader(public_blob), _Reader(private_blob)
    if pub.string().decode("ascii") != key_type:
        raise ValueError("the public blob's type differs from the header")
    key: PrivateKey
    if key_type == "ssh-ed25519":
        key = ed25519.Ed25519PrivateKey.from_private_bytes(priv.string())
    elif key_type in CURVES:
        pub.string()  # curve name
        key = ec.derive_private_key(priv.mpint(), CURVES[key_type][1]())
    elif key_type == "ssh-rsa":
        e, n = pub.mpint(), pub.mpint()
        d, p, q, iqmp = priv.mpint(), priv.mpint(), priv.mpint(), priv.mpint()
        key = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), iqmp,
                                    rsa.RSAPublicNumbers(e, n)).private_key()
    elif key_type == "ssh-dss":
        p, q, g, y = pub.mpint(), pub.mpint(), pub.mpint(), pub.mpint()
        key = dsa.DSAPrivateNumbers(priv.mpint(), dsa.DSAPublicNumbers(
            y, dsa.DSAParameterNumbers(p, q, g))).private_key()
    else:
        raise ValueError(f"unsupported key type {key_type[:40]!r}")
    if public_key_of(key).blob != public_blob:
        raise ValueError("the private key does not match the public key in the file")
    return key


def _ppk_fields(text: str) -> tuple[dict[str, str], bytes, bytes]:
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    fields: dict[str, str] = {}
    blobs: dict[str, bytes] = {}
    i = 0
    while i < len(lines):
        name, sep, value = lines[i].partition(": ")
        i += 1
        if not sep:
            continue
        if name in ("Public-Lines", "Private-Lines"):
            count = int(value)
            blobs[name] = base64.b64decode("".join(lines[i:i + count]), validate=True)
            i += count
        else:
            fields[name] = value
    if "Public-Lines" not in blobs or "Private-Lines" not in blobs:
        raise ValueError("missing key lines")
    return fields, blobs["Public-Lines"], blobs["Private-Lines"]


def _load_ppk(text: str, passphrase: bytes | None) -> LoadedPrivateKey:
    header = text.split("\n", 1)[0].strip()
    m = re.fullmatch(r"PuTTY-User-Key-File-([23]): (\S+)", header)
    if not m:
        raise ValueError("only PuTTY key files of version 2 and 3 are supported")
    version, key_type = int(m.group(1)), m.group(2)
    fields, public_blob, private_blob = _ppk_fields(text)
    encryption = fields.get("Encryption", "")
    comment = fields.get("Comment", "")
    if encryption not in ("none", "aes256-cbc"):
        raise ValueError(f"unknown encryption {encryption[:20]!r}")
    if encryption == "aes256-cbc" and not passphrase:
        raise TypeError("this .ppk file is encrypted: a passphrase is needed")
    secret = passphrase if encryption != "none" and passphrase else b""
    if version == 3:
        cipher_key, iv, mac_key = _ppk3_keys(fields, secret, encryption)
        digest: Callable[[], object] = hashlib.sha256
    else:
        cipher_key = (hashlib.sha1(b"\0\0\0\0" + secret).digest()
                      + hashlib.sha1(b"\0\0\0\1" + secret).digest())[:32]
        iv = bytes(16)
        mac_key = hashlib.sha1(PPK_V2_MAC_KEY_PREFIX + secret).digest()
        digest = hashlib.sha1
    if encryption == "aes256-cbc":
        if len(private_blob) % 16:
            raise ValueError("the encrypted private part is not whole AES blocks")
        decryptor = Cipher(algorithms.AES(cipher_key), modes.CBC(iv)).decryptor()
        private_blob = decryptor.update(private_blob) + decryptor.finalize()
    mac_data = b"".join(_string(x) for x in (
        key_type.encode(), encryption.encode(), comment.encode(), public_blob, private_blob))
    expected = hmac.new(mac_key, mac_data, digest).hexdigest()  # type: ignore[arg-type]
    if not hmac.compare_digest(expected, fields.get("Private-MAC", "").lower()):
        raise ValueError("the file's MAC does not verify (wrong passphrase, or edited)")
    return LoadedPrivateKey(_ppk_key(key_type, public_blob, private_blob), comment,
                            f"ppk{version}")


def _ppk3_keys(fields: dict[str, str], secret: bytes, encryption: str
               ) -> tuple[bytes, bytes, bytes]:
    if encryption == "none":
        return b"", b"", b""
    from argon2.low_level import Type, hash_secret_raw

    flavour = fields.get("Key-Derivation", "")
    if flavour not in ARGON2_FLAVOURS:
        raise ValueError(f"unknown key derivation {flavour[:20]!r}")
    memory = int(fields["Argon2-Memory"])
    if memory > 1 << 21:  # 2 GiB: a hostile file must not exhaust memory
        raise ValueError("Argon2-Memory is implausibly large")
    out = hash_secret_raw(
        secret, bytes.fromhex(fields["Argon2-Salt"]), time_cost=int(fields["Argon2-Passes"]),
        memory_cost=memory, parallelism=int(fields["Argon2-Parallelism"]), hash_len=80,
        type={"Argon2d": Type.D, "Argon2i": Type.I, "Argon2id": Type.ID}[flavour],
    )
    return out[:32], out[32:48], out[48:]


def dump_ppk(key: PrivateKey, comment: str = "", passphrase: bytes | None = None) -> str:
    """A PuTTY key file of version 3 (Argon2id + AES-256-CBC with a passphrase)."""
    key_type, public_blob, private_blob = _private_blob(key)
    comment = comment.replace("\r", " ").replace("\n", " ")
    lines = [f"PuTTY-User-Key-File-3: {key_type}",
             f"Encryption: {'aes256-cbc' if passphrase else 'none'}", f"Comment: {comment}"]
    if passphrase:
        salt = secrets.token_bytes(16)
        fields = {"Key-Derivation": "Argon2id", "Argon2-Memory": str(ARGON2_MEMORY_KIB),
                  "Argon2-Passes": str(ARGON2_PASSES),
                  "Argon2-Parallelism": str(ARGON2_PARALLELISM), "Argon2-Salt": salt.hex()}
        cipher_key, iv, mac_key = _ppk3_keys(fields, passphrase, "aes256-cbc")
        # Pad to whole AES blocks (PuTTY ignores the padding after the key fields).
        private_blob += secrets.token_bytes(-len(private_blob) % 16)
        encryptor = Cipher(algorithms.AES(cipher_key), modes.CBC(iv)).encryptor()
        stored = encryptor.update(private_blob) + encryptor.finalize()
        header_fields = [f"{k}: {v}" for k, v in fields.items()]
    else:
        mac_key, stored, header_fields = b"", private_blob, []
    mac_data = b"".join(_string(x) for x in (
        key_type.encode(), lines[1].split(": ", 1)[1].encode(), comment.encode(),
        public_blob, private_blob))
    mac = hmac.new(mac_key, mac_data, hashlib.sha256).hexdigest()
    public_lines = _wrap64(public_blob)
    private_lines = _wrap64(stored)
    out = [*lines, f"Public-Lines: {len(public_lines)}", *public_lines, *header_fields,
           f"Private-Lines: {len(private_lines)}", *private_lines, f"Private-MAC: {mac}"]
    return "\n".join(out) + "\n"


def _wrap64(data: bytes) -> list[str]:
    text = base64.b64encode(data).decode()
    return [text[i:i + 64] for i in range(0, len(text), 64)]
