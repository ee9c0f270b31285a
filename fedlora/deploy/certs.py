"""TLS for the SuperLink: a private CA and a server certificate it signs, with the SANs clients will dial.

Flower verifies the SuperLink against ``--root-certificates`` (SuperNodes) / ``root-certificates`` (``flwr``
CLI), and checks the address used against the certificate's subjectAltName, so every name or IP a client uses
must be listed. Keys are ECDSA P-384 from the ``cryptography`` package; the CA key never leaves the server.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora.deploy.files import write_private, write_public

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"


@dataclass(frozen=True)
class ServerCertificates:
    """Paths of what ``make_certificates`` wrote. Copy only ``ca_cert`` to clients."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def san_entry(host: str) -> x509.GeneralName:
    """An IP address SAN for an IP literal, a DNS SAN otherwise (TLS matches IPs only against IP SANs)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(c in host for c in " /:@") or host.startswith(".") or host.endswith("."):
        raise ValueError(f"--host {host!r} is neither an IP address nor a DNS name; give the name or IP that "
                         "SuperNodes and the flwr CLI use to reach the SuperLink, e.g. --host server.example.org")
    return x509.DNSName(host)


def make_certificates(out: Path, hosts: list[str], days: int = 365, force: bool = False) -> ServerCertificates:
    """Write ca.crt, ca.key (0600), server.pem (signed by the CA, SANs = ``hosts``) and server.key (0600)."""
    if not hosts:
        raise ValueError("no --host given: list every name / IP the SuperLink is reached at, e.g. "
                         "--host 10.0.0.5 --host server.example.org")
    if days < 1:
        raise ValueError(f"--days {days}: a certificate must be valid for at least one day")
    sans = [san_entry(h) for h in dict.fromkeys(hosts)]
    now = dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)  # 5 min slack for clock skew

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora SuperLink CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    out.mkdir(parents=True, exist_ok=True)
    paths = ServerCertificates(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY)
    for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key):  # all or nothing
        if p.exists() and not force:
            raise FileExistsError(f"{p} exists; pass --force to make a new CA and server certificate (every "
                                  "SuperNode then needs the new ca.crt)")
    pem = serialization.Encoding.PEM
    write_private(paths.ca_key, _key_pem(ca_key), force)
    write_public(paths.ca_cert, ca_cert.public_bytes(pem), force)
    write_private(paths.server_key, _key_pem(key), force)
    write_public(paths.server_cert, cert.public_bytes(pem), force)
    return paths


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
