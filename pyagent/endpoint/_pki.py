"""Development PKI: an EC P-256 certificate authority and the endpoint's TLS server certificate.

Agents pin the CA file (`ca` in their config), so the CA is created once and never replaced silently; the server
certificate is re-issued from it whenever it no longer fits (expiring, missing a name, not from this CA).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pyagent.endpoint._config import is_ip_address

CA_DAYS = 3650
SERVER_DAYS = 365
RENEW_BEFORE = dt.timedelta(days=30)
DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")
_WILDCARD_HOSTS = {"0.0.0.0", "::", ""}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class KeyPair:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def server_names(listen_host: str) -> tuple[set[str], set[IPAddress]]:
    """DNS names and IP addresses the server certificate must cover for this listen host."""
    dns: set[str] = set()
    ips: set[IPAddress] = set()
    for name in (*DEFAULT_NAMES, listen_host):
        if name in _WILDCARD_HOSTS:
            continue
        if is_ip_address(name):
            ips.add(ipaddress.ip_address(name))
        else:
            dns.add(name.lower())
    return dns, ips


def create_ca() -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pyagent"),
        # A random suffix tells two development CAs apart in error messages.
        x509.NameAttribute(NameOID.COMMON_NAME, f"pyagent development CA {secrets.token_hex(4)}"),
    ])
    now = _now()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(key, cert)


def issue_server_cert(ca: KeyPair, listen_host: str) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    dns, ips = server_names(listen_host)
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in sorted(dns)]
    alt_names += [x509.IPAddress(ip) for ip in sorted(ips, key=str)]
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pyagent"),
            x509.NameAttribute(NameOID.COMMON_NAME, "pyagent endpoint"),
        ]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return KeyPair(key, cert)


def server_cert_problem(server: KeyPair, ca: KeyPair, listen_host: str) -> str | None:
    """Why this server certificate must be re-issued, or None if it is still good."""
    try:
        server.cert.verify_directly_issued_by(ca.cert)
    except (InvalidSignature, ValueError, TypeError) as exc:
        return f"not issued by the current CA ({type(exc).__name__})"
    if server.cert.public_key() != server.key.public_key():
        return "certificate and key do not match"
    if server.cert.not_valid_after_utc - _now() < RENEW_BEFORE:
        return f"expires {server.cert.not_valid_after_utc:%Y-%m-%d}"
    try:
        san = server.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no subjectAltName"
    have_dns = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    have_ips = set(san.get_values_for_type(x509.IPAddress))
    dns, ips = server_names(listen_host)
    missing = sorted(dns - have_dns) + sorted(str(ip) for ip in ips - have_ips)
    if missing:
        return "does not cover " + ", ".join(missing)
    return None


def load_key_pair(key_pem: bytes, cert_pem: bytes) -> KeyPair:
    """Parse PEM data; raises ValueError (or TypeError for a non-EC key) on bad input."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"expected an EC private key, got {type(key).__name__}")
    return KeyPair(key, x509.load_pem_x509_certificate(cert_pem))


# -- agent (client) certificates ------------------------------------------------------------------------------------

CLIENT_DAYS = 30
MAX_CSR_BYTES = 16 * 1024


class CsrError(ValueError):
    """A certificate signing request that cannot be used; the message says why."""


def public_key_fingerprint(public: x509.Certificate | x509.CertificateSigningRequest) -> str:
    """SHA-256 (hex) of the DER SubjectPublicKeyInfo: the identity of a key, whatever certificate carries it."""
    der = public.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return digest.finalize().hex()


def load_csr(pem: str) -> x509.CertificateSigningRequest:
    """Parse and check an agent's CSR: PEM, a valid self-signature, an EC P-256/P-384 or Ed25519 or RSA >= 2048 key."""
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if not isinstance(pem, str) or not pem.strip():
        raise CsrError("'csr' must be a PEM certificate signing request")
    if len(pem) > MAX_CSR_BYTES:
        raise CsrError(f"'csr' is longer than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(pem.encode("ascii", "strict"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise CsrError(f"'csr' is not a PEM certificate signing request: {exc}") from None
    if not csr.is_signature_valid:
        raise CsrError("'csr' has an invalid signature (it must be signed with the key it carries)")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise CsrError(f"'csr' uses the curve {key.curve.name}; use P-256 or P-384")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise CsrError(f"'csr' has a {key.key_size}-bit RSA key; at least 2048 bits are required")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise CsrError(f"'csr' has an unsupported key type {type(key).__name__}")
    return csr


def issue_client_cert(ca: KeyPair, csr: x509.CertificateSigningRequest, agent_id: str,
                      lifetime: dt.timedelta) -> x509.Certificate:
    """A client certificate for `agent_id` (subject CN) on the CSR's key. Only the key is taken from the CSR: the
    endpoint alone decides the name, the lifetime and the extensions."""
    now = _now()
    public = csr.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pyagent agents"),
            x509.NameAttribute(NameOID.COMMON_NAME, agent_id),
        ]))
        .issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"urn:pyagent:agent:{agent_id}")]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
