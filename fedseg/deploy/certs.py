"""Credentials for a deployed fleet, made with ``cryptography`` (no hand-written crypto).

* a certificate authority (``ca.crt``, ``ca.key``): the vehicles trust the SuperLink through it
  (``flower-supernode --root-certificates ca.crt``, ``root-certificates`` in ``flwr``'s config);
* the SuperLink's TLS certificate and key (``superlink.crt``, ``superlink.key``), signed by the CA,
  valid for ``localhost``/``127.0.0.1``/``::1`` and every host name or address it is given;
* one EC P-384 key pair per vehicle (``vehicles/<name>.key`` in OpenSSH format, what
  ``flower-supernode --auth-supernode-private-key`` loads, and ``<name>.pub``, what
  ``flwr supernode register`` takes). Only the ``.pub`` files leave the credentials folder for the
  server; each ``.key`` goes to its own vehicle and nowhere else.

Private keys are written with mode 0600. Existing files are never overwritten (``FileExistsError``
naming the file): re-running with more vehicles adds only the new ones' keys.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = ("localhost", "127.0.0.1", "::1")
CURVE = ec.SECP384R1()  # Flower's node authentication takes NIST curves; P-384 is its documented one


@dataclass(frozen=True)
class FleetCredentials:
    """Where :func:`make_credentials` put everything."""

    ca_cert: Path
    superlink_cert: Path
    superlink_key: Path
    vehicle_keys: dict[str, Path]  # vehicle name -> private key (its public key: same path, ".pub")
    created: list[Path]  # the files this call wrote (others were there already and are kept)


def _write(path: Path, data: bytes, *, private: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL  # never overwrite a credential
    try:
        fd = os.open(path, flags, 0o600 if private else 0o644)
    except FileExistsError:
        raise FileExistsError(f"{path}: exists; remove it or choose another --out to make new credentials") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*LOOPBACK, *hosts]):  # keep order, drop repeats
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
                 issuer_key: ec.EllipticCurvePrivateKey, *, days: int, ca: bool,
                 hosts: Sequence[str] = ()) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        builder = (builder.add_extension(_san(hosts), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return builder.sign(issuer_key, hashes.SHA384())


def vehicle_names(count: int, names: Sequence[str] = ()) -> list[str]:
    """``names`` if given, else ``vehicle_0 .. vehicle_<count-1>`` (the collector's folder names)."""
    if names:
        bad = [n for n in names if not n or "/" in n or n.startswith(".")]
        if bad:
            raise ValueError(f"vehicle names {bad}: a name must be a plain file name")
        return list(dict.fromkeys(names))
    if count < 0:
        raise ValueError(f"vehicles={count}: must be >= 0")
    return [f"vehicle_{i}" for i in range(count)]


def make_vehicle_key(directory: Path, name: str) -> Path:
    """An EC P-384 key pair for vehicle ``name``: ``<name>.key`` (OpenSSH, 0600) and ``<name>.pub``."""
    key = ec.generate_private_key(CURVE)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    private = _write(directory / f"{name}.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
        private=True)
    _write(directory / f"{name}.pub", public + f" fedseg-{name}\n".encode(), private=False)
    return private


def make_credentials(out: Path, *, vehicles: Sequence[str], hosts: Sequence[str] = (),
                     days: int = 365) -> FleetCredentials:
    """The CA and SuperLink certificate (made once; kept if present) and a key pair per new vehicle."""
    out = Path(out)
    before = {p for p in out.rglob("*") if p.is_file()} if out.is_dir() else set()
    ca_cert, ca_key = out / "ca.crt", out / "ca.key"
    link_cert, link_key = out / "superlink.crt", out / "superlink.key"
    if not ca_cert.exists():
        key = ec.generate_private_key(CURVE)
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedseg fleet CA")])
        _write(ca_key, _pem_key(key), private=True)
        _write(ca_cert, _certificate("fedseg fleet CA", key, ca_name, key, days=days, ca=True).public_bytes(
            serialization.Encoding.PEM), private=False)
    if not link_cert.exists():
        ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
        signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
        if not isinstance(signer, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{ca_key}: not an EC private key")
        key = ec.generate_private_key(CURVE)
        _write(link_key, _pem_key(key), private=True)
        cert = _certificate("fedseg superlink", key, ca.subject, signer, days=days, ca=False, hosts=hosts)
        _write(link_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    keys = {}
    for name in vehicles:
        path = out / "vehicles" / f"{name}.key"
        keys[name] = path if path.exists() else make_vehicle_key(out / "vehicles", name)
    created = sorted(p for p in out.rglob("*") if p.is_file() and p not in before)
    return FleetCredentials(ca_cert, link_cert, link_key, keys, created)
