"""Credentials the way PKI users expect: certificates a strict verifier accepts (Python 3.13's default,
``ssl.VERIFY_X509_STRICT``), a server certificate that never outlives its CA, a passphrase-protected
CA key, vehicle keys made on the vehicle (``fedseg-vehicle keygen``), ``--insecure`` only on loopback;
and (marker ``deploy``) a vehicle revoked with ``flwr supernode unregister`` is refused by a real
SuperLink while a registered one still trains.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import signal
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID
from deploy_fleet import LocalFleet

from fedseg.deploy.certs import make_credentials, make_vehicle_key
from fedseg.deploy.launch import VehicleLaunch, check_vehicle, is_loopback, supernode_command
from fedseg.sim.deploy import certs_main, vehicle_main


def _handshake(certs: Path, server_name: str, *, strict: bool = True) -> str:
    """A real TLS handshake on loopback: a server with the SuperLink's certificate, a client trusting only
    the CA (with ``VERIFY_X509_STRICT`` as Python 3.13 sets it). The negotiated version; ``ssl.SSLError``
    if the client refuses the chain."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs / "superlink.crt", certs / "superlink.key")
    client_ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    if strict:
        client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass  # the client refused the chain: it says why

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                version = str(tls.version())
                tls.sendall(b"x")
        finally:
            thread.join(timeout=10)
    return version


def test_a_strict_verifier_accepts_the_superlink_certificate_for_each_of_its_names(tmp_path: Path) -> None:
    make_credentials(tmp_path, vehicles=[], hosts=["link.example.org"])

    for name in ("localhost", "127.0.0.1", "link.example.org"):
        assert _handshake(tmp_path, name).startswith("TLSv1.")
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        _handshake(tmp_path, "other.example.org")


def test_every_certificate_carries_the_extensions_rfc_5280_asks_for(tmp_path: Path) -> None:
    made = make_credentials(tmp_path, vehicles=[])
    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    link = x509.load_pem_x509_certificate(made.superlink_cert.read_bytes())

    def ext(cert: x509.Certificate, kind: type) -> x509.Extension:
        return cert.extensions.get_extension_for_class(kind)

    ca_ski = ext(ca, x509.SubjectKeyIdentifier).value
    assert ca_ski == x509.SubjectKeyIdentifier.from_public_key(ca.public_key())
    assert ext(ca, x509.AuthorityKeyIdentifier).value.key_identifier == ca_ski.digest
    assert ext(link, x509.AuthorityKeyIdentifier).value.key_identifier == ca_ski.digest  # names its issuer
    assert ext(link, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(
        link.public_key())
    constraints = ext(ca, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert ext(link, x509.BasicConstraints).value.ca is False
    usage = ext(link, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert list(ext(link, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ext(ca, x509.KeyUsage).value.key_cert_sign


def test_the_superlink_certificate_never_outlives_its_ca(tmp_path: Path) -> None:
    made = make_credentials(tmp_path, vehicles=[], ca_days=30, days=365)
    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    link = x509.load_pem_x509_certificate(made.superlink_cert.read_bytes())
    other = make_credentials(tmp_path / "long", vehicles=[], ca_days=3650, days=365)
    long_link = x509.load_pem_x509_certificate(other.superlink_cert.read_bytes())

    assert link.not_valid_after_utc == ca.not_valid_after_utc
    lifetime = long_link.not_valid_after_utc - long_link.not_valid_before_utc
    assert dt.timedelta(days=365) <= lifetime <= dt.timedelta(days=365, minutes=6)


def test_the_ca_key_is_encrypted_with_the_passphrase_and_needed_to_sign(tmp_path: Path) -> None:
    make_credentials(tmp_path, vehicles=[], ca_passphrase=b"correct horse")
    pem = (tmp_path / "ca.key").read_bytes()

    assert b"ENCRYPTED" in pem
    with pytest.raises(TypeError, match="encrypted"):
        load_pem_private_key(pem, password=None)
    load_pem_private_key(pem, password=b"correct horse")
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    # A new SuperLink certificate (renewal) needs the CA key and its passphrase; one line if either is wrong.
    (tmp_path / "superlink.crt").rename(tmp_path / "old.crt")
    (tmp_path / "superlink.key").rename(tmp_path / "old.key")
    for passphrase, message in ((b"wrong", "wrong passphrase"), (None, "encrypted; give its passphrase")):
        with pytest.raises(ValueError, match=message) as err:
            make_credentials(tmp_path, vehicles=[], ca_passphrase=passphrase)
        assert str(tmp_path / "ca.key") in str(err.value) and "\n" not in str(err.value)
    make_credentials(tmp_path, vehicles=[], ca_passphrase=b"correct horse")
    assert _handshake(tmp_path, "localhost").startswith("TLSv1.")


def test_a_ca_kept_offline_is_asked_for_only_to_sign(tmp_path: Path) -> None:
    make_credentials(tmp_path, vehicles=[])
    (tmp_path / "ca.key").rename(tmp_path / "offline.key")  # moved off the server after signing

    kept = make_credentials(tmp_path, vehicles=[])  # nothing to sign: the CA key is not needed
    (tmp_path / "superlink.crt").unlink()
    (tmp_path / "superlink.key").unlink()
    with pytest.raises(ValueError, match=r"ca.key: not here \(kept offline\?\)"):
        make_credentials(tmp_path, vehicles=[])

    assert kept.created == []


Cli = Callable[..., tuple[int, str, str]]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run an entry point as its console script would, with no terminal: (exit status, stdout, stderr)."""
    def run(main: Callable[[list[str]], None], *args: str, env: dict[str, str] | None = None,
            terminal: bool = False) -> tuple[int, str, str]:
        monkeypatch.setattr("sys.stdin", _Terminal() if terminal else io.StringIO())
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        try:
            main(list(args))
            code = 0
        except SystemExit as stop:
            code = int(stop.code or 0)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def test_fedseg_certs_wants_a_passphrase_or_an_explicit_no(tmp_path: Path, cli: Cli) -> None:
    refused = cli(certs_main, "--out", str(tmp_path / "a"))
    made = cli(certs_main, "--out", str(tmp_path / "b"), "--ca-passphrase-env", "CA_PASS", env={"CA_PASS": "s3"})
    unset = cli(certs_main, "--out", str(tmp_path / "c"), "--ca-passphrase-env", "NOT_SET_ANYWHERE")
    server_keys = cli(certs_main, "--out", str(tmp_path / "d"), "--no-ca-passphrase", "--vehicles", "2")
    discouraged = cli(certs_main, "--out", str(tmp_path / "e"), "--no-ca-passphrase", "--names", "car",
                      "--server-side-vehicle-keys")

    assert refused[0] == 2 and not (tmp_path / "a" / "ca.key").exists()
    assert refused[2].startswith("fedseg-certs: error: ") and "--ca-passphrase-env" in refused[2]
    assert made[0] == 0, made[2]
    load_pem_private_key((tmp_path / "b" / "ca.key").read_bytes(), password=b"s3")
    assert unset[0] == 2 and "NOT_SET_ANYWHERE" in unset[2] and len(unset[2].splitlines()) == 1
    assert server_keys[0] == 2 and "fedseg-vehicle keygen" in server_keys[2]
    assert "--server-side-vehicle-keys" in server_keys[2] and len(server_keys[2].splitlines()) == 1
    assert discouraged[0] == 0 and (tmp_path / "e" / "vehicles" / "car.key").exists()


def test_fedseg_certs_asks_twice_on_a_terminal_for_a_new_ca(tmp_path: Path, cli: Cli,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter(["one", "other", "same", "same"])
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))

    differ = cli(certs_main, "--out", str(tmp_path), terminal=True)
    made = cli(certs_main, "--out", str(tmp_path), terminal=True)

    assert differ[0] == 2 and "the two passphrases differ; nothing written" in differ[2]
    assert made[0] == 0, made[2]
    load_pem_private_key((tmp_path / "ca.key").read_bytes(), password=b"same")


def test_fedseg_vehicle_keygen_writes_a_private_key_once_and_prints_the_public_key(tmp_path: Path, cli: Cli) -> None:
    first = cli(vehicle_main, "keygen", "--out", str(tmp_path / "etc"), "--name", "car_7")
    key = tmp_path / "etc" / "car_7.key"
    before = key.read_bytes()
    again = cli(vehicle_main, "keygen", "--out", str(tmp_path / "etc"), "--name", "car_7")

    assert first[0] == 0, first[2]
    public = (tmp_path / "etc" / "car_7.pub").read_text()
    assert public.startswith("ecdsa-sha2-nistp384 ") and public.strip() in first[1].splitlines()
    assert f"flwr supernode register {tmp_path / 'etc' / 'car_7.pub'}" in first[1]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert load_ssh_public_key(public.encode()) == load_ssh_private_key(before, None).public_key()
    assert again[0] == 2 and key.read_bytes() == before
    assert again[2].strip().startswith(f"fedseg-vehicle: error: {key}: exists") and len(again[2].splitlines()) == 1


@pytest.mark.parametrize(("superlink", "allowed"), [
    ("127.0.0.1:9092", True), ("127.8.9.10:9092", True), ("[::1]:9092", True), ("localhost:9092", True),
    ("LOCALHOST:9092", True), ("[::ffff:127.0.0.1]:9092", True), ("10.0.0.5:9092", False),
    ("link.example.org:9092", False), ("0.0.0.0:9092", False), ("[::]:9092", False), ("localhost.evil.org:1", False),
    ("http://127.0.0.1:9092", False)])
def test_insecure_is_refused_for_a_superlink_off_this_machine(superlink: str, allowed: bool) -> None:
    launch = VehicleLaunch(superlink=superlink, partition_id=0, num_partitions=2, insecure=True)

    assert is_loopback(superlink) is allowed
    if allowed:
        assert "(insecure)" in check_vehicle(launch)
    else:
        with pytest.raises(ValueError, match=r"--insecure \(no TLS\) is for a SuperLink on this machine") as err:
            check_vehicle(launch)
        assert superlink in str(err.value) and "\n" not in str(err.value)


def test_transport_flags_after_the_separator_cannot_undo_tls(tmp_path: Path) -> None:
    made = make_credentials(tmp_path, vehicles=[])
    launch = VehicleLaunch(superlink="link.example.org:9092", partition_id=0, num_partitions=2,
                           root_certificates=made.ca_cert)

    check_vehicle(launch)
    assert supernode_command(launch, ["--max-retries", "3"])[-2:] == ["--max-retries", "3"]
    for extra in (["--insecure"], ["--superlink=10.0.0.9:1"]):
        with pytest.raises(ValueError, match="after --: set the SuperLink and TLS with fedseg-vehicle's own"):
            supernode_command(launch, extra)


# ---- rotation and revocation on a real SuperLink (loopback, TLS, node authentication) -------------

def _wait(condition, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(1)


# A revoked SuperNode's own stop: Flower 1.42 answers a 401 by sending itself SIGINT, from its message
# retry (once, under a lock) and from its heartbeat thread (unlocked). The first SIGINT runs Flower's
# graceful exit (status 0) and restores the default handler, so when the two race the second one ends
# the process by SIGINT (seen on CI: -2). systemd's Restart=on-failure counts both as clean.
STOPPED_CLEANLY = (0, -signal.SIGINT)

@pytest.mark.deploy
def test_a_revoked_vehicle_is_refused_and_a_rotated_one_trains(tmp_path: Path) -> None:
    make_credentials(tmp_path / "certs", vehicles=[])
    keys = {name: make_vehicle_key(tmp_path / f"box_{name}", name) for name in ("a", "b", "b2")}  # each on its box
    fleet = LocalFleet(tmp_path, certs=tmp_path / "certs", env_extra={"FEDSEG_DATA_CACHE": str(tmp_path / "cache"),
                                                                       "WANDB_MODE": "offline"})
    share = {"a": ["--partition-id", "0", "--num-partitions", "2"], "b": ["--partition-id", "1", "--num-partitions",
                                                                          "2"]}
    try:
        (tmp_path / "server").mkdir()
        fleet.start_superlink("--disable-runtime-dependency-installation", cwd=tmp_path / "server")
        ids = {name: fleet.register(key.with_suffix(".pub")) for name, key in keys.items() if name != "b2"}
        vehicle_a = fleet.start_vehicle("a", *share["a"], key=keys["a"])
        old_b = fleet.start_vehicle("b", *share["b"], key=keys["b"])
        _wait(lambda: {fleet.nodes().get(i) for i in ids.values()} == {"online"}, "two vehicles online", 120)

        # Revoke a: the SuperLink answers its next request 401 and its SuperNode stops by itself, cleanly as
        # systemd's Restart=on-failure counts it, so it stays down; started again, it is refused at once.
        fleet.unregister(ids["a"])
        assert vehicle_a.wait(timeout=90) in STOPPED_CLEANLY
        assert fleet.nodes()[ids["a"]] == "unregistered"
        assert '"POST /v1/fleet/pull-messages HTTP/1.1" 401' in fleet.log("superlink")
        reused = fleet.flwr("supernode", "register", str(keys["a"].with_suffix(".pub")), "fleet")
        assert reused.returncode != 0 and "Public key already in use" in reused.stdout + reused.stderr
        restarted = fleet.start_vehicle("a", *share["a"], key=keys["a"])
        assert restarted.wait(timeout=90) != 0
        assert "Failed to activate SuperNode" in fleet.log("a")

        # Rotate b: a new key made on its box, registered; the old one unregistered (its SuperNode stops);
        # b comes back with the new key.
        ids["b2"] = fleet.register(keys["b2"].with_suffix(".pub"))
        fleet.unregister(ids["b"])
        assert old_b.wait(timeout=90) in STOPPED_CLEANLY
        fleet.start_vehicle("b", *share["b"], key=keys["b2"])
        _wait(lambda: fleet.nodes().get(ids["b2"]) == "online", "b online with its new key", 120)

        result = fleet.run("experiment=smoke federation.num_clients=2 federation.min_fit_clients=1 "
                           "federation.rounds=1 deploy.join_timeout=15", timeout=420)
    finally:
        fleet.stop()

    assert result.status == "finished:completed", result.output[-3000:]
    assert "fedseg: 1 of 2 vehicles joined" in result.output and "round   1/1" in result.output
    rows = [json.loads(line) for line in (tmp_path / "server" / "outputs" / "deploy" / str(result.run_id) /
                                          "metrics.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in rows[1:]] == [1]
