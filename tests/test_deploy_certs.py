"""Deployment helpers: the CA and server certificate, SuperNode keys, the flwr connection entry."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key

from fedlora.deploy import make_certificates, make_node_keys, write_connection

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"), ["127.0.0.1", "server.example.org", "::1"])


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_server_cert_has_every_host_as_the_right_san_kind(certs):
    san = _load(certs.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert san.get_values_for_type(x509.DNSName) == ["server.example.org"]


def test_ca_signs_the_server_cert_and_only_the_ca_may_sign(certs):
    ca, server = _load(certs.ca_cert), _load(certs.server_cert)
    server.verify_directly_issued_by(ca)  # raises on a wrong issuer or signature
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    key = load_pem_private_key(certs.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    other = make_certificates(certs.ca_cert.parent.parent / "other", ["127.0.0.1"])
    with pytest.raises(Exception):  # noqa: B017 (cryptography raises InvalidSignature or ValueError)
        server.verify_directly_issued_by(_load(other.ca_cert))


def test_private_files_are_owner_only_and_never_overwritten(certs, tmp_path):
    for p in (certs.ca_key, certs.server_key):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    for p in (certs.ca_cert, certs.server_cert):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
    with pytest.raises(FileExistsError, match="--force"):
        make_certificates(certs.ca_cert.parent, ["127.0.0.1"])
    before = certs.ca_cert.read_bytes()
    make_certificates(certs.ca_cert.parent, ["127.0.0.1"], force=True)
    assert certs.ca_cert.read_bytes() != before
    assert stat.S_IMODE(certs.ca_key.stat().st_mode) == 0o600


@pytest.mark.parametrize("host", ["", "https://x.org", "a b", "host:80"])
def test_bad_host_names_the_flag(tmp_path, host):
    with pytest.raises(ValueError, match="--host"):
        make_certificates(tmp_path, [host])


def _handshake(certs, server_name: str, ca: Path) -> None:
    """A real TLS 1.2+ handshake on 127.0.0.1: server presents server.pem, client trusts only ``ca``."""
    srv_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with srv_ctx.wrap_socket(conn, server_side=True) as s:
                s.recv(1)
        except (ssl.SSLError, OSError):
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        cli_ctx = ssl.create_default_context(cafile=str(ca))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with cli_ctx.wrap_socket(raw, server_hostname=server_name) as s:
                s.sendall(b"x")
    finally:
        t.join(10)
        listener.close()


def test_tls_handshake_verifies_sans_and_ca(tmp_path):
    certs = make_certificates(tmp_path / "a", ["127.0.0.1", "server.example.org"])
    _handshake(certs, "127.0.0.1", certs.ca_cert)
    _handshake(certs, "server.example.org", certs.ca_cert)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|match"):
        _handshake(certs, "other.example.org", certs.ca_cert)  # not among the SANs
    wrong = make_certificates(tmp_path / "b", ["127.0.0.1"])
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(certs, "127.0.0.1", wrong.ca_cert)  # a CA that did not sign it


def test_node_keys_are_nist_ec_openssh_pairs_flower_accepts(tmp_path):
    keys = make_node_keys(tmp_path, 3)
    assert [k.private.name for k in keys] == ["node-1", "node-2", "node-3"]
    publics = set()
    for k in keys:
        assert stat.S_IMODE(k.private.stat().st_mode) == 0o600
        priv = load_ssh_private_key(k.private.read_bytes(), None)  # what flower-supernode does
        pub = load_ssh_public_key(k.public.read_bytes())  # what `flwr supernode register` does
        assert isinstance(priv, ec.EllipticCurvePrivateKey) and isinstance(priv.curve, ec.SECP384R1)
        assert priv.public_key().public_numbers() == pub.public_numbers()
        publics.add(k.public.read_bytes())
    assert len(publics) == 3
    with pytest.raises(FileExistsError, match="--force"):
        make_node_keys(tmp_path, 1)


def test_connection_entry_keeps_other_entries_and_requires_tls(tmp_path, certs):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n[superlink.local]\naddress = ":local:"\n')
    path = write_connection("site", "server.example.org:9092", certs.ca_cert, home=home)
    cfg = tomllib.loads(path.read_text())
    assert cfg["superlink"]["default"] == "local"
    assert cfg["superlink"]["local"] == {"address": ":local:"}
    assert cfg["superlink"]["site"] == {"address": "server.example.org:9092",
                                        "root-certificates": str(certs.ca_cert.resolve())}
    with pytest.raises(ValueError, match="--ca is required"):
        write_connection("site", "server.example.org:9092", home=home)
    write_connection("site", "127.0.0.1:9092", insecure=True, home=home, make_default=True)
    cfg = tomllib.loads(path.read_text())
    assert cfg["superlink"]["site"] == {"address": "127.0.0.1:9092", "insecure": True}
    assert cfg["superlink"]["default"] == "site"
    with pytest.raises(ValueError, match="--address"):
        write_connection("site", "https://server:9092", certs.ca_cert, home=home)


def test_flwr_reads_the_connection_entry(tmp_path, certs, monkeypatch):
    """flwr's own parser accepts what we write (TLS on, our CA)."""
    from flwr.cli.flower_config import read_superlink_connection

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    write_connection("site", "127.0.0.1:9092", certs.ca_cert)
    conn = read_superlink_connection("site")
    assert conn.address == "127.0.0.1:9092" and not conn.insecure
    assert conn.root_certificates == str(certs.ca_cert.resolve())
