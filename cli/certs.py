"""`c2d certs`: a private certificate authority and one key and certificate per service, for
mutual TLS on the mesh's internal hops (see `mesh.tls`).

Each service's certificate names it (its identity) in the subjectAltName: the short name, its
names inside a Kubernetes namespace `c2d-system`, and `localhost` and 127.0.0.1 for loopback.
The certificates serve both ends of a hop, since every internal service is a server and most
are also clients."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cli.common import write_file
from mesh.tls import ALLOWED_VAR, CA_VAR, CERT_VAR, KEY_VAR

DEFAULT_NAMES = ("provider", "operator-service", "engine")
DEFAULT_DAYS = 365
NAMESPACE = "c2d-system"
# Who calls whom on the internal hops: the identities each service lets call it.
CALLERS = {"operator-service": ("provider",), "engine": ("operator-service",)}
# A certificate valid from a little before now, so that a peer whose clock is behind
# accepts it at once.
_CLOCK_SKEW = datetime.timedelta(minutes=5)
_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class Authority:
    """A certificate authority's key and certificate, to issue service certificates with."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)


@dataclass(frozen=True)
class Issued:
    """One service's private key and certificate, PEM-encoded."""

    name: str
    key_pem: bytes
    cert_pem: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def check_name(name: str) -> str:
    """`name` if it can be a service's identity: a DNS label (it becomes a DNS name in the
    certificate and a file name)."""
    if not _NAME.fullmatch(name) or name == "ca":
        raise ValueError(
            f"{name!r} cannot name a service: use lowercase letters, digits and hyphens "
            "(and not 'ca')"
        )
    return name


def dns_names(name: str) -> list[str]:
    """The DNS names a service's certificate carries."""
    service = f"{name}.{NAMESPACE}.svc"
    return [name, f"{name}.{NAMESPACE}", service, f"{service}.cluster.local", "localhost"]


def _validity(
    builder: x509.CertificateBuilder, days: int, now: datetime.datetime
) -> x509.CertificateBuilder:
    if days < 1:
        raise ValueError("a certificate must be valid for at least one day")
    return builder.not_valid_before(now - _CLOCK_SKEW).not_valid_after(
        now + datetime.timedelta(days=days)
    )


def new_authority(common_name: str = "c2d mesh CA", days: int = DEFAULT_DAYS) -> Authority:
    """A new CA with an EC P-256 key that may sign service certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    cert = _validity(builder, days, now).sign(key, hashes.SHA256())
    return Authority(key, cert)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def issue(authority: Authority, name: str, days: int = DEFAULT_DAYS) -> Issued:
    """A key and a certificate for the service `name`, signed by `authority`, good for both
    serving and calling."""
    check_name(name)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(dns) for dns in dns_names(name)]
    alt_names.append(x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(authority.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()),
            critical=False,
        )
    )
    cert = _validity(builder, days, now).sign(authority.key, hashes.SHA256())
    return Issued(name, _key_pem(key), cert.public_bytes(serialization.Encoding.PEM))


@dataclass(frozen=True)
class ServiceFiles:
    """Where one service's files were written, and the environment it needs."""

    name: str
    cert: Path
    key: Path
    ca: Path

    def env(self) -> dict[str, str]:
        env = {CERT_VAR: str(self.cert), KEY_VAR: str(self.key), CA_VAR: str(self.ca)}
        callers = CALLERS.get(self.name)
        if callers is not None:
            env[ALLOWED_VAR] = ",".join(callers)
        return env


def write_certs(
    out: Path, names: Sequence[str], *, days: int = DEFAULT_DAYS, force: bool = False
) -> tuple[Path, list[ServiceFiles]]:
    """Makes a CA in `out` (ca.crt, ca.key) and `NAME.crt`, `NAME.key` for each name; key
    files are owner-only. Refuses (FileExistsError) to replace a CA unless `force`."""
    for name in names:
        check_name(name)
    if len(set(names)) != len(names):
        raise ValueError("each service name may be given once")
    ca_cert, ca_key = out / "ca.crt", out / "ca.key"
    if not force and (ca_cert.exists() or ca_key.exists()):
        raise FileExistsError(
            f"{out} already holds a CA; pass --force to replace it and every certificate"
        )
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    authority = new_authority(days=days)
    write_file(ca_key, authority.key_pem, 0o600)
    write_file(ca_cert, authority.cert_pem, 0o644)
    written = []
    for name in names:
        issued = issue(authority, name, days)
        files = ServiceFiles(name, out / f"{name}.crt", out / f"{name}.key", ca_cert)
        write_file(files.key, issued.key_pem, 0o600)
        write_file(files.cert, issued.cert_pem, 0o644)
        written.append(files)
    return ca_cert, written


def _report(ca: Path, services: list[ServiceFiles]) -> str:
    lines = [
        f"wrote {ca} (the CA every service trusts) and {ca.with_suffix('.key')} (its key: "
        "needed only to issue certificates, keep it off the nodes)"
    ]
    for files in services:
        lines.append(f"\n{files.name}: {files.cert} {files.key}")
        lines.extend(f"  {name}={value}" for name, value in files.env().items())
        if files.name not in CALLERS:
            lines.append(f"  ({ALLOWED_VAR}: the names that may call it, if any)")
    return "\n".join(lines)


async def cmd_certs(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.names.split(",") if n.strip()]
    try:
        ca, services = write_certs(
            Path(args.out).absolute(), names, days=args.days, force=args.force
        )
    except (ValueError, FileExistsError) as error:
        print(f"c2d certs: {error}", file=sys.stderr)
        return 1
    print(_report(ca, services))
    return 0


def register(commands: Any) -> None:
    """Adds `c2d certs` to the `c2d` parser."""
    certs = commands.add_parser(
        "certs", help="make a CA and a certificate per service, for mutual TLS between them"
    )
    certs.add_argument("--out", required=True, metavar="DIR", help="folder to write them to")
    certs.add_argument(
        "--names",
        default=",".join(DEFAULT_NAMES),
        help=f"the services, comma-separated (default {','.join(DEFAULT_NAMES)})",
    )
    certs.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity in days")
    certs.add_argument("--force", action="store_true", help="replace an existing CA")
    certs.set_defaults(run=cmd_certs)
