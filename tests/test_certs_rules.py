"""`dicomfw certs` commands that read the rules file, run as an admin runs them: `install` into a
listener or upstream the rules name, and `check --config` over every endpoint's files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dicomfw.pki import certs
from tests.harness import Pki, rules
from tests.opshelpers import dicomfw
from tests.pkihelpers import stale_crl


@pytest.fixture
def live(tmp_path: Path, pki: Pki) -> Path:
    """A rules file whose TLS listener and upstream use copies of the site's files, in
    ``live/``, so that a test may replace them."""
    live = tmp_path / "live"
    live.mkdir()
    text = rules(pki, 11112, listener_tls=True)
    for pair in (pki.fw_server, pki.fw_client):
        for path in (pair.cert, pair.key):
            shutil.copy(path, live / path.name)
            text = text.replace(f": {path}", f": {live / path.name}")
    (tmp_path / "rules.yaml").write_text(text)
    return live


def test_install_into_a_listener_named_in_the_rules(tmp_path: Path, pki: Pki, live: Path) -> None:
    new = certs.issue(pki.ca_dir, "fw-server", "server", tmp_path / "new", ["localhost"])
    result = dicomfw(
        "certs", "install", "--cert", new.cert, "--key", new.key,
        "--config", tmp_path / "rules.yaml", "--listener", "front",
    )  # fmt: skip
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        f"installed {live / 'fw-server.pem'} and {live / 'fw-server.key'} (key matches, a server"
        f" certificate, chains to {pki.ca}); kept the previous files as"
        f" {live / 'fw-server.pem.prev'}, {live / 'fw-server.key.prev'}; reload dicomfw to use"
        " them\n"
    )
    assert (live / "fw-server.pem").read_bytes() == new.cert.read_bytes()


@pytest.mark.parametrize(
    ("target", "kind", "needs"),
    [("--listener", "client", "serverAuth"), ("--upstream", "server", "clientAuth")],
)
def test_install_refuses_a_certificate_made_for_the_other_role(
    tmp_path: Path, pki: Pki, live: Path, target: str, kind: str, needs: str
) -> None:
    """A client certificate cannot serve a listener (its clients would refuse it in the
    handshake), nor a server certificate an upstream connection: refused before a file moves."""
    new = certs.issue(pki.ca_dir, "wrong", kind, tmp_path / "new", ["localhost"])
    before = {path.name: path.read_bytes() for path in live.iterdir()}
    result = dicomfw(
        "certs", "install", "--cert", new.cert, "--key", new.key,
        "--config", tmp_path / "rules.yaml", target, "front" if target == "--listener" else "pacs",
    )  # fmt: skip
    wanted = "server" if kind == "client" else "client"
    hint = (
        "a listener presents it to its clients: issue one with --kind server"
        if wanted == "server"
        else "dicomfw presents it to an upstream: issue one with --kind client"
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"dicomfw certs: {new.cert}: not a {wanted} certificate: its extendedKeyUsage"
        f" ({kind}Auth) does not allow {needs} ({hint})\n"
    )
    assert {path.name: path.read_bytes() for path in live.iterdir()} == before


def test_install_names_the_endpoints_the_rules_define(tmp_path: Path, pki: Pki, live: Path) -> None:
    result = dicomfw(
        "certs", "install", "--cert", pki.fw_server.cert, "--key", pki.fw_server.key,
        "--config", tmp_path / "rules.yaml", "--listener", "back",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        f"dicomfw certs: {tmp_path / 'rules.yaml'}: no listener 'back' with a TLS certificate"
        " and key (defined: front)\n"
    )


def test_check_config_verifies_each_file_in_its_role(tmp_path: Path, pki: Pki, live: Path) -> None:
    path = tmp_path / "rules.yaml"
    fine = dicomfw("certs", "check", "--config", path)
    assert (fine.returncode, fine.stderr) == (0, "")
    assert fine.stdout.startswith(
        f"OK: {path}: 2 certificate(s), 2 key(s), 1 CA file(s), 0 CRL file(s); "
    )
    # The upstream's certificate replaced by one from another CA: a check against that CA (the
    # only one --ca used to offer) passes it, the CA the upstream is configured with does not.
    other_ca = pki.ca_dir.parent / "other-ca"
    stranger = certs.issue(other_ca, "fw-client", "client", tmp_path / "stranger")
    shutil.copy(stranger.cert, live / "fw-client.pem")
    shutil.copy(stranger.key, live / "fw-client.key")
    assert dicomfw("certs", "check", "--config", path, "--ca", other_ca / "ca.pem").returncode == 0
    # And the listener's key replaced by another pair's.
    shutil.copy(pki.pacs.key, live / "fw-server.key")
    found = dicomfw("certs", "check", "--config", path)
    assert found.returncode == 1
    assert found.stdout.splitlines() == [
        f"{live / 'fw-server.key'}: listeners.front.tls.key: does not belong to the certificate"
        f" {live / 'fw-server.pem'} (their public keys differ: a key of another certificate, or"
        " a certificate renewed with a new key?)",
        f"{live / 'fw-client.pem'}: upstreams.pacs.tls.cert: does not chain to {pki.ca}: not"
        " issued by the given CA (its issuer is CN=somebody else's CA)",
        f"checked {path}: 2 certificate(s), 2 key(s), 1 CA file(s), 0 CRL file(s)",
    ]


def test_check_config_fails_on_an_expired_crl_and_warns_before_one_expires(
    tmp_path: Path, pki: Pki, live: Path
) -> None:
    path = tmp_path / "rules.yaml"
    crl = live / "ca.crl"
    text = path.read_text()
    assert text.count(f"ca: {pki.ca}}}") == 1  # the listener's
    path.write_text(text.replace(f"ca: {pki.ca}}}", f"ca: {pki.ca}, crl: {crl}}}"))
    stale_crl(pki.ca_dir, crl, days_ago=2)
    expired = dicomfw("certs", "check", "--config", path)
    assert expired.returncode == 1
    [line, summary] = expired.stdout.splitlines()
    assert line.startswith(
        f"{crl}: listeners.front.tls.crl: CRL of CN=dicomfw site CA: EXPIRED on "
    )
    assert line.endswith(" (2 days ago): a listener that loads it refuses every client certificate")
    assert summary == f"checked {path}: 2 certificate(s), 2 key(s), 1 CA file(s), 1 CRL file(s)"
    assert dicomfw("certs", "crl", "--ca", pki.ca_dir, "--crl", crl, "--days", "5").returncode == 0
    soon = dicomfw("certs", "check", "--config", path)
    assert soon.returncode == 1 and " (5 days left): renew it" in soon.stdout
    assert dicomfw("certs", "check", "--config", path, "--crl-warn-days", "3").returncode == 0
