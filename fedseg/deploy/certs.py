"""Credentials for a deployed fleet, made with ``cryptography`` (no hand-written crypto).

* a certificate authority (``ca.crt``, ``ca.key``): the vehicles trust the SuperLink through it
  (``flower-supernode --root-certificates ca.crt``, ``root-certificates`` in ``flwr``'s config). Its key
  is encrypted with a passphrase (``BestAvailableEncryption``) unless the caller says otherwise, and is
  needed only to sign: after signing it can move off the server (kept offline);
* the SuperLink's TLS certificate and key (``superlink.crt``, ``superlink.key``), signed by the CA,
  valid for ``localhost``/``127.0.0.1``/``::1`` and every host name or address it is given, and never
  past the CA's own expiry. ``superlink.key`` is unencrypted: ``flower-superlink`` reads it unattended;
* an EC P-384 key pair per vehicle (``<name>.key`` in OpenSSH format, what ``flower-supernode
  --auth-supernode-private-key`` loads, and ``<name>.pub``, what ``flwr supernode register`` takes),
  made on the vehicle itself by ``fedseg-vehicle keygen`` (:func:`make_vehicle_key`), so the private key
  never travels. :func:`make_credentials` can still make them on the server (discouraged).

Every certificate carries Subject and Authority Key Identifiers, critical Basic Constraints (the CA's
with path length 0) and Key Usage; the SuperLink's Extended Key Usage is serverAuth. That is what
strict verifiers (``ssl.VERIFY_X509_STRICT``, Python 3.13's default) ask for.

Private keys are written with mode 0600. Existing files are never overwritten (``FileExistsError``
naming the file): re-running adds only what is missing.
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
CA_DAYS = 3650  # the CA outlives many SuperLink certificates; renewing it means new ca.crt on every vehicle
SERVER_DAYS = 365
CA_NAME = "fedseg fleet CA"


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


def _pem_key(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*LOOPBACK, *hosts]):  # keep order, drop repeats
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _key_usage(*, sign_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, key_cert_sign=sign_certificates, crl_sign=sign_certificates,
                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                         key_agreement=False, encipher_only=False, decipher_only=False)


def _builder(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
             not_after: dt.datetime) -> x509.CertificateBuilder:
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)).not_valid_after(not_after)
            .add_extension(ski, critical=False))


def ca_certificate(key: ec.EllipticCurvePrivateKey, *, days: int = CA_DAYS) -> x509.Certificate:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (_builder(CA_NAME, key, name, dt.datetime.now(dt.UTC) + dt.timedelta(days=days))
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(_key_usage(sign_certificates=True), critical=True))
    return builder.sign(key, hashes.SHA384())


def server_certificate(key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                       *, hosts: Sequence[str] = (), days: int = SERVER_DAYS) -> x509.Certificate:
    """The SuperLink's certificate: serverAuth for ``hosts`` and loopback, expiring no later than ``ca``."""
    not_after = min(dt.datetime.now(dt.UTC) + dt.timedelta(days=days), ca.not_valid_after_utc)
    try:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value)
    except x509.ExtensionNotFound:  # a CA made before fedseg wrote identifiers
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = (_builder("fedseg superlink", key, ca.subject, not_after)
               .add_extension(aki, critical=False)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(_key_usage(sign_certificates=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
               .add_extension(_san(hosts), critical=False))
    return builder.sign(ca_key, hashes.SHA384())


def load_ca_key(path: Path, passphrase: bytes | None) -> ec.EllipticCurvePrivateKey:
    """The CA's private key; one-line ``ValueError`` if it is absent, encrypted without a passphrase given,
    or the passphrase is wrong."""
    if not path.is_file():
        raise ValueError(f"{path}: not here (kept offline?); bring the CA key back to sign a new SuperLink "
                         "certificate, then move it away again")
    data = path.read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as err:
        if passphrase is None:
            raise ValueError(f"{path}: encrypted; give its passphrase (--ca-passphrase-env VAR, or the "
                             "prompt)") from None
        if "not encrypted" not in str(err):
            raise
        key = serialization.load_pem_private_key(data, password=None)  # made unencrypted: the passphrase is moot
    except ValueError:
        raise ValueError(f"{path}: wrong passphrase, or not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an EC private key")  # noqa: TRY004
    return key


def needs_ca_key(out: Path) -> tuple[bool, bool]:
    """(whether :func:`make_credentials` in ``out`` will use the CA key, whether it will make a new CA)."""
    new_ca = not (Path(out) / "ca.crt").exists()
    return new_ca or not (Path(out) / "superlink.crt").exists(), new_ca


def vehicle_names(count: int, names: Sequence[str] = ()) -> list[str]:
    """``names`` if given, else ``vehicle_0 .. vehicle_<count-1>`` (the collector's folder names)."""
    if names:
        bad = [n for n in names if not valid_name(n)]
        if bad:
            raise ValueError(f"vehicle names {bad}: a name must be a plain file name")
        return list(dict.fromkeys(names))
    if count < 0:
        raise ValueError(f"vehicles={count}: must be >= 0")
    return [f"vehicle_{i}" for i in range(count)]


def valid_name(name: str) -> bool:
    """Whether ``name`` can name a key file (no folder, not hidden)."""
    return bool(name) and "/" not in name and not name.startswith(".")


def make_vehicle_key(directory: Path, name: str) -> Path:
    """An EC P-384 key pair for vehicle ``name``: ``<name>.key`` (OpenSSH, 0600) and ``<name>.pub``.

    Run on the vehicle (``fedseg-vehicle keygen``): only the ``.pub`` leaves it, for ``flwr supernode
    register``. ``FileExistsError`` naming the file if either exists; nothing is then written."""
    if not valid_name(name):
        raise ValueError(f"--name {name!r}: a name must be a plain file name")
    private, public_path = Path(directory) / f"{name}.key", Path(directory) / f"{name}.pub"
    for path in (private, public_path):
        if path.exists():
            raise FileExistsError(f"{path}: exists (a key is never overwritten); for a new key choose another "
                                  "--name, register it, then unregister the old one")
    key = ec.generate_private_key(CURVE)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()), private=True)
    _write(public_path, public + f" fedseg-{name}\n".encode(), private=False)
    return private


def make_credentials(out: Path, *, vehicles: Sequence[str], hosts: Sequence[str] = (), days: int = SERVER_DAYS,
                     ca_days: int = CA_DAYS, ca_passphrase: bytes | None = None) -> FleetCredentials:
    """The CA and SuperLink certificate (each made once; kept if present) and a key pair per new vehicle
    (``vehicles``: keys made here, on the server; prefer ``fedseg-vehicle keygen`` on each vehicle).

    ``ca_passphrase`` encrypts a new CA key and opens an existing one; ``None`` writes it unencrypted
    (tests). The CA key is read only when a SuperLink certificate is to be signed."""
    out = Path(out)
    before = {p for p in out.rglob("*") if p.is_file()} if out.is_dir() else set()
    ca_cert, ca_key = out / "ca.crt", out / "ca.key"
    link_cert, link_key = out / "superlink.crt", out / "superlink.key"
    if not ca_cert.exists():
        key = ec.generate_private_key(CURVE)
        _write(ca_key, _pem_key(key, ca_passphrase), private=True)
        _write(ca_cert, ca_certificate(key, days=ca_days).public_bytes(serialization.Encoding.PEM), private=False)
    if not link_cert.exists():
        ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
        if ca.not_valid_after_utc <= dt.datetime.now(dt.UTC):
            raise ValueError(f"{ca_cert}: expired on {ca.not_valid_after_utc:%Y-%m-%d}; make a new CA in another "
                             "folder (docs/GUIDE.md, Rotate and revoke)")
        signer = load_ca_key(ca_key, ca_passphrase)
        key = ec.generate_private_key(CURVE)
        _write(link_key, _pem_key(key), private=True)
        cert = server_certificate(key, ca, signer, hosts=hosts, days=days)
        _write(link_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    keys = {}
    for name in vehicles:
        path = out / "vehicles" / f"{name}.key"
        keys[name] = path if path.exists() else make_vehicle_key(out / "vehicles", name)
    created = sorted(p for p in out.rglob("*") if p.is_file() and p not in before)
    return FleetCredentials(ca_cert, link_cert, link_key, keys, created)
