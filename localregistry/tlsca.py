"""A throwaway certificate authority for TLS tests, plus the test host names.

    ca = TestCA(tmp / "ca")                       # writes tmp/ca/ca.crt
    cert, key = ca.issue(["registry-a.connector-test"], tmp / "tls")
    ... Registry(..., tls=(cert, key), public_host="registry-a.connector-test")
    skopeo.copy(..., dest_cert_dir=ca.cert_dir)   # containers/image: *.crt = trusted roots

The certificates satisfy Go's crypto/x509 (skopeo, buildah, podman, docker),
OpenSSL and Python's ``ssl``: the CA has a critical ``basicConstraints
CA:TRUE`` and ``keyUsage keyCertSign``; leaves have SANs (the DNS names plus
IP 127.0.0.1), ``CA:FALSE``, ``digitalSignature, keyEncipherment``,
``extendedKeyUsage serverAuth`` and SKI/AKI. Keys are RSA-2048 by default
(``key_type="ec"`` for P-256, much faster to generate).

File naming matters for containers/image ``--cert-dir`` directories: every
``*.crt`` there is a trusted root, and a ``*.key`` without a matching
``*.cert`` (client certificate) is an *error*. So the CA directory holds only
``ca.crt`` (the CA key stays in memory), and issued leaves are written as
``NAME-cert.pem`` / ``NAME-key.pem``, which such directories ignore.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Names the TLS tests use for "different registries"; scripts/setup maps them
# to 127.0.0.1 in /etc/hosts.
TEST_HOSTS: tuple[str, ...] = (
    "registry-a.connector-test",
    "registry-b.connector-test",
    "other.connector-test",
)

LOOPBACK = "127.0.0.1"


class TestHostsError(RuntimeError):
    """A test host name does not resolve to 127.0.0.1."""

    __test__ = False  # not a pytest test class


def check_test_hosts(names: Sequence[str] = TEST_HOSTS) -> None:
    """Raise :class:`TestHostsError` unless every name resolves to 127.0.0.1 (only)."""
    problems: list[str] = []
    for name in names:
        try:
            infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
        except socket.gaierror as e:
            problems.append(f"{name}: does not resolve ({e.strerror})")
            continue
        addrs = sorted({str(info[4][0]) for info in infos})
        if addrs != [LOOPBACK]:
            problems.append(f"{name}: resolves to {', '.join(addrs)}, not {LOOPBACK}")
    if problems:
        raise TestHostsError(
            "test host names must resolve to 127.0.0.1 via /etc/hosts; run scripts/setup "
            f"(it appends '127.0.0.1 {' '.join(TEST_HOSTS)}'): " + "; ".join(problems))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


KeyType = Literal["rsa", "ec"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _new_key(key_type: KeyType) -> PrivateKey:
    # RSA-2048 takes ~70 ms to generate; EC P-256 well under 1 ms and is
    # accepted just as widely (Go, OpenSSL, Python).
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"unknown key_type {key_type!r}")


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class TestCA:
    """A self-signed CA written to ``directory/ca.crt``; see the module docstring.

    The private key is kept in memory only (a ``*.key`` file would break the
    directory's use as a containers/image cert dir). ``directory`` may be
    passed directly as ``--cert-dir``/``--dest-cert-dir``/``--src-cert-dir``.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, common_name: str = "localregistry test CA",
                 *, days: int = 30, key_type: KeyType = "rsa") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key_type: KeyType = key_type
        self._key = _new_key(key_type)
        now = _now()
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "localregistry"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ])
        ski = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
        self.cert: x509.Certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            # Back-dated: tolerates clock skew; Go rejects not-yet-valid certs.
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem: bytes = self.cert.public_bytes(serialization.Encoding.PEM)
        _write(self.cert_path, self.cert_pem)

    @property
    def cert_path(self) -> Path:
        """``directory/ca.crt``: the PEM to trust (mitmproxy's upstream CA, curl --cacert, ...)."""
        return self.directory / "ca.crt"

    @property
    def cert_dir(self) -> Path:
        """A containers/image cert dir trusting this CA (the directory itself)."""
        return self.directory

    def write_key(self, path: Path) -> Path:
        """Write the CA private key (PEM, mode 0600) to ``path``; keep it out of cert dirs."""
        if Path(path).suffix == ".key" and Path(path).parent.resolve() == self.directory.resolve():
            raise ValueError("a *.key file in the CA directory breaks its use as a cert dir")
        _write(Path(path), _key_pem(self._key), 0o600)
        return Path(path)

    def issue(self, names: Sequence[str], directory: Path | None = None, *,
              ip_addresses: Sequence[str] = (LOOPBACK,), days: int = 30,
              stem: str | None = None) -> tuple[Path, Path]:
        """Issue a server certificate for DNS ``names`` (+ IP 127.0.0.1).

        IP literals in ``names`` become IP SANs; ``ip_addresses`` are added
        as IP SANs (pass ``()`` to leave out 127.0.0.1).

        Writes ``STEM-cert.pem`` (the leaf) and
        ``STEM-key.pem`` (0600) into ``directory`` (default: the CA
        directory), STEM defaulting to the first name. Returns
        ``(cert_path, key_path)``, ready for ``tls=`` of Registry/TokenServer.
        """
        names = list(names)
        if not names and not ip_addresses:
            raise ValueError("a server certificate needs at least one name or IP address")
        out = Path(directory) if directory is not None else self.directory
        out.mkdir(parents=True, exist_ok=True)
        stem = _UNSAFE.sub("_", stem or (names[0] if names else ip_addresses[0]))
        key = _new_key(self.key_type)
        now = _now()
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        # IP literals among names become IP SANs (Go ignores IPs in DNS SANs).
        ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        dns: list[str] = []
        for n in [*names, *ip_addresses]:
            try:
                ip = ipaddress.ip_address(n)
            except ValueError:
                if n not in dns:
                    dns.append(n)
            else:
                if ip not in ips:
                    ips.append(ip)
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
        sans += [x509.IPAddress(ip) for ip in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "localregistry"),
                x509.NameAttribute(NameOID.COMMON_NAME, (names or list(ip_addresses))[0][:64]),
            ]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(min(now + dt.timedelta(days=days), self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    # keyEncipherment is for RSA key transport; RFC 5480 forbids
                    # it on EC keys.
                    digital_signature=True, content_commitment=False,
                    key_encipherment=isinstance(key, rsa.RSAPrivateKey),
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                           critical=False)
            .sign(self._key, hashes.SHA256())
        )
        cert_path, key_path = out / f"{stem}-cert.pem", out / f"{stem}-key.pem"
        _write(key_path, _key_pem(key), 0o600)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path

    def client_context(self) -> ssl.SSLContext:
        """A Python client SSL context trusting only this CA (hostname checks on)."""
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=self.cert_pem.decode())


def self_signed_certificate(names: Sequence[str], directory: Path, *, stem: str | None = None,
                            ip_addresses: Sequence[str] = (LOOPBACK,), days: int = 30,
                            key_type: KeyType = "ec", authority_key_id: bool = False,
                            basic_constraints: bool = False) -> tuple[Path, Path]:
    """A bare self-signed server certificate, as old tooling and appliances make them.

    By default it carries the SANs (DNS ``names`` + ``ip_addresses``) and nothing else: no
    Authority/Subject Key Identifier, no basicConstraints, no key usage. The certificate is its
    own trust anchor: OpenSSL (``curl --cacert CERT``, Python ``ssl``) accepts it for those
    names, RFC 5280-strict verifiers (cryptography's, OpenSSL's X509_STRICT) refuse it.
    ``authority_key_id``/``basic_constraints`` add those extensions (``CA:FALSE``).

    Writes ``STEM-cert.pem`` and ``STEM-key.pem`` (0600) into ``directory`` (names a
    containers/image cert dir ignores) and returns ``(cert_path, key_path)``, ready for ``tls=``.
    """
    names = list(names)
    if not names and not ip_addresses:
        raise ValueError("a server certificate needs at least one name or IP address")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    stem = _UNSAFE.sub("_", stem or (names[0] if names else ip_addresses[0]))
    key = _new_key(key_type)
    now = _now()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (names or list(ip_addresses))[0][:64])])
    sans: list[x509.GeneralName] = []
    for n in [*names, *ip_addresses]:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
    )
    if basic_constraints:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    if authority_key_id:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                                        critical=False)
    cert = builder.sign(key, hashes.SHA256())
    cert_path, key_path = out / f"{stem}-cert.pem", out / f"{stem}-key.pem"
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def server_context(tls: tuple[Path, Path]) -> ssl.SSLContext:
    """A Python server SSL context for a ``(cert_path, key_path)`` pair, HTTP/1.1 only."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls[0]), str(tls[1]))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
