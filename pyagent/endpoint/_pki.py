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
