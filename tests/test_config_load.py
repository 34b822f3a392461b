"""The rules-file loader: a valid file becomes the expected Policy; every mistake an admin can
make is reported at its exact ``file:line: key.path``, all of them in one pass."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from dicomfw.config.describe import describe
from dicomfw.config.load import load_config
from dicomfw.config.model import ClientTLS, Config, Limits, Listener, ServerTLS, Upstream
from dicomfw.core.policy import (
    VERIFICATION_SOP_CLASS,
    Accept,
    Allow,
    AllowRule,
    CertificateIdentity,
    Peer,
    Policy,
    PresentedIdentity,
    Route,
)
from dicomfw.errors import ConfigErrors

REPO = Path(__file__).resolve().parent.parent
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"

# The smallest valid file. Error cases below edit one line of it, so the line numbers in their
# expected messages can be read off here.
MINIMAL = """\
listeners:
  - name: modalities
    bind: 0.0.0.0:11112
upstreams:
  pacs: {host: pacs.example, port: 104}
peers:
  - ae_title: CT01
    networks: [10.1.2.0/24]
routes:
  - listener: modalities
    called_ae: PACS
    upstream: pacs
    allow:
      - services: [C-ECHO, C-STORE]
        sop_classes: [CTImageStorage]
"""
#         line:  1 listeners, 3 bind, 5 pacs, 7 ae_title, 8 networks, 10 listener,
#                11 called_ae, 12 upstream, 14 services, 15 sop_classes

Errors = Callable[[str], list[str]]


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Work in tmp_path so error messages start with the plain ``rules.yaml:``."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def errors_of(in_tmp: Path) -> Errors:
    def load(text: str) -> list[str]:
        (in_tmp / "rules.yaml").write_text(text)
        with pytest.raises(ConfigErrors) as caught:
            load_config("rules.yaml")
        return [str(error) for error in caught.value.errors]

    return load


def edit(old: str, new: str, text: str = MINIMAL) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def touch(directory: Path, *names: str) -> None:
    for name in names:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text("dummy\n")


# -- valid files -----------------------------------------------------------------------------

FULL = """\
listeners:
  - name: modalities
    bind: 0.0.0.0:11112
  - name: remote
    bind: "[::]:2762"
    tls:
      cert: certs/fw.pem
      key: certs/fw.key
      ca: certs/ca.pem
      crl: certs/ca.crl
      min_version: "1.3"
upstreams:
  pacs:
    host: pacs.example
    port: 2762
    tls: {ca: certs/pacs-ca.pem, cert: certs/client.pem, key: certs/client.key,
          server_name: pacs.internal, verify_hostname: false}
  legacy: {host: 10.20.0.5, port: 104, tls: false}
peers:
  - ae_title: CT01
    networks: [10.1.2.0/24, "2001:db8::/32", 10.1.2.3]
  - ae_title: " WS1 "
    networks: [10.1.4.0/24]
    certificate:
      subject_cn: ws1.example
      fingerprint_sha256: "FINGERPRINT"
routes:
  - name: ct-to-pacs
    listener: modalities
    called_ae: PACS
    upstream: pacs
    calling_ae: [CT01]
    rewrite: {called_ae: PACS_TLS, calling_ae: FW1}
    allow:
      - services: [C-STORE]
        sop_classes: [CTImageStorage, "1.2.840.10008.5.1.4.1.1.4"]
        transfer_syntaxes: [ExplicitVRLittleEndian]
      - services: [C-FIND, C-MOVE]
        sop_classes: [StudyRootQueryRetrieveInformationModelFind,
                      StudyRootQueryRetrieveInformationModelMove]
        move_destinations: [WS1]
  - listener: remote
    called_ae: ARCHIVE
    upstream: legacy
    allow:
      - services: [C-ECHO]
limits:
  max_pdu_bytes: 65536
  idle_seconds: 600
  artim_seconds: 2.5
""".replace("FINGERPRINT", ":".join(["AB", "CD", "EF", "01", "23", "45", "67", "89"] * 4))
FULL_FILES = (
    "certs/fw.pem",
    "certs/fw.key",
    "certs/ca.pem",
    "certs/ca.crl",
    "certs/pacs-ca.pem",
    "certs/client.pem",
    "certs/client.key",
)


@pytest.fixture
def full_config(in_tmp: Path) -> Config:
    touch(in_tmp, *FULL_FILES)
    (in_tmp / "rules.yaml").write_text(FULL)
    return load_config("rules.yaml")


def test_a_valid_file_builds_listeners_upstreams_and_limits(full_config: Config) -> None:
    base = full_config.source.parent
    assert full_config.source == base / "rules.yaml"
    assert full_config.listeners == (
        Listener("modalities", "0.0.0.0", 11112),
        Listener(
            "remote",
            "::",
            2762,
            ServerTLS(
                cert=base / "certs/fw.pem",
                key=base / "certs/fw.key",
                ca=base / "certs/ca.pem",
                crl=base / "certs/ca.crl",
                min_version="TLSv1.3",
            ),
        ),
    )
    assert full_config.upstreams == (
        Upstream(
            "pacs",
            "pacs.example",
            2762,
            ClientTLS(
                ca=base / "certs/pacs-ca.pem",
                cert=base / "certs/client.pem",
                key=base / "certs/client.key",
                server_name="pacs.internal",
                verify_hostname=False,
            ),
        ),
        Upstream("legacy", "10.20.0.5", 104),
    )
    assert base.is_absolute()
    assert full_config.limits == Limits(max_pdu_bytes=65536, idle_seconds=600.0, artim_seconds=2.5)


def test_a_valid_file_builds_the_expected_policy(full_config: Config) -> None:
    net = ipaddress.ip_network
    assert full_config.policy.peers == (
        Peer("CT01", (net("10.1.2.0/24"), net("2001:db8::/32"), net("10.1.2.3/32"))),
        Peer(
            "WS1",
            (net("10.1.4.0/24"),),
            CertificateIdentity(
                subject_cn="ws1.example", fingerprint_sha256="abcdef0123456789" * 4
            ),
        ),
    )
    assert full_config.policy.routes == (
        Route(
            name="ct-to-pacs",
            listener="modalities",
            called_ae="PACS",
            upstream="pacs",
            allow=(
                AllowRule(
                    frozenset({"C-STORE"}),
                    sop_classes=frozenset({CT, MR}),
                    transfer_syntaxes=frozenset({EXPLICIT_LE}),
                ),
                AllowRule(
                    frozenset({"C-FIND", "C-MOVE"}),
                    sop_classes=frozenset({STUDY_FIND, STUDY_MOVE}),
                    move_destinations=frozenset({"WS1"}),
                ),
            ),
            calling_aes=frozenset({"CT01"}),
            upstream_called_ae="PACS_TLS",
            upstream_calling_ae="FW1",
        ),
        Route(
            name="remote/ARCHIVE",
            listener="remote",
            called_ae="ARCHIVE",
            upstream="legacy",
            allow=(AllowRule(frozenset({"C-ECHO"})),),
        ),
    )


def test_the_loaded_policy_answers_association_requests(full_config: Config) -> None:
    verdict = full_config.policy.decide_association(
        "modalities", ipaddress.ip_address("10.1.2.7"), "CT01", "PACS", None
    )
    assert isinstance(verdict, Accept)
    assert verdict.route.upstream_called_ae == "PACS_TLS"
    ws1 = PresentedIdentity("ws1.example", fingerprint_sha256="abcdef0123456789" * 4)
    verdict = full_config.policy.decide_association(
        "remote", ipaddress.ip_address("10.1.4.9"), "WS1", "ARCHIVE", ws1
    )
    assert isinstance(verdict, Accept)


def test_describe_names_the_facts_an_admin_checks(full_config: Config) -> None:
    text = describe(full_config)
    base = full_config.source.parent
    for fact in (
        "modalities  0.0.0.0:11112  plain DICOM (no TLS)",
        "remote      [::]:2762      mutual TLS 1.3 or later, client certificate required",
        f"client CA    {base / 'certs/ca.pem'}",
        "pacs.example:2762",
        "server name  NOT verified (verify_hostname: false)",
        "10.1.2.0/24, 2001:db8::/32, 10.1.2.3/32",
        "certificate must have subject CN ws1.example, SHA-256 " + "abcdef0123456789" * 4,
        "ct-to-pacs: listener modalities, called AE PACS -> upstream pacs (pacs.example:2762)",
        "upstream sees  called AE PACS_TLS, calling AE FW1",
        "C-STORE on CTImageStorage, MRImageStorage",
        "transfer syntaxes ExplicitVRLittleEndian",
        "C-FIND, C-MOVE on StudyRootQueryRetrieveInformationModelFind",
        "C-MOVE destinations WS1",
        "remote/ARCHIVE: listener remote, called AE ARCHIVE -> upstream legacy (10.20.0.5:104)",
        "calling AEs  any peer",
        "C-ECHO on any SOP class",
        "max PDU size              65536 bytes",
        "ARTIM timeout             2.5 s",
    ):
        assert fact in text


def test_c_echo_next_to_storage_sop_classes_also_allows_verification(in_tmp: Path) -> None:
    (in_tmp / "rules.yaml").write_text(MINIMAL)
    route = load_config("rules.yaml").policy.routes[0]
    assert route.allow[0].sop_classes == frozenset({CT})
    verdict = Policy.filter_context(route, 1, VERIFICATION_SOP_CLASS, ("1.2.840.10008.1.2",))
    assert verdict.result == 0
    assert isinstance(Policy.decide_request(route, "C-ECHO", VERIFICATION_SOP_CLASS, None), Allow)


def test_omitted_limits_keep_the_model_defaults(in_tmp: Path) -> None:
    (in_tmp / "rules.yaml").write_text(MINIMAL)
    assert load_config(in_tmp / "rules.yaml").limits == Limits()


@pytest.mark.parametrize(
    ("given", "workers"),
    [
        ("", 1),
        ("workers: 1\n", 1),
        ("workers: 64\n", 64),
        ("workers: auto\n", min(os.cpu_count() or 1, 64)),
    ],
)
def test_workers_is_a_count_or_auto_and_one_by_default(
    in_tmp: Path, given: str, workers: int
) -> None:
    (in_tmp / "rules.yaml").write_text(MINIMAL + given)
    assert load_config("rules.yaml").workers == workers


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("0", "must be between 1 and 64, got 0"),
        ("65", "must be between 1 and 64, got 65"),
        ("two", "expected an integer from 1 to 64 or auto, got a string ('two')"),
        ('"2"', "expected an integer from 1 to 64 or auto, got a string ('2') "
         "(write it without quotes)"),
        ("true", "expected an integer from 1 to 64 or auto, got a boolean (true)"),
    ],
)  # fmt: skip
def test_a_workers_mistake_is_reported_at_its_line(
    errors_of: Errors, given: str, message: str
) -> None:
    assert errors_of(MINIMAL + f"workers: {given}\n") == [f"rules.yaml:16: workers: {message}"]


def test_routes_with_disjoint_callers_or_a_later_fallback_are_not_ambiguous(in_tmp: Path) -> None:
    routes = """\
  - {name: ct, listener: modalities, called_ae: PACS, upstream: pacs, calling_ae: [CT01],
     allow: [{services: [C-ECHO]}]}
  - {name: mr, listener: modalities, called_ae: PACS, upstream: pacs, calling_ae: [MR01],
     allow: [{services: [C-ECHO]}]}
  - {name: rest, listener: modalities, called_ae: PACS, upstream: pacs,
     allow: [{services: [C-ECHO]}]}
"""
    text = edit(
        "  - ae_title: CT01\n",
        "  - {ae_title: MR01, networks: [10.1.3.0/24]}\n  - ae_title: CT01\n",
    )
    (in_tmp / "rules.yaml").write_text(text.split("routes:\n")[0] + "routes:\n" + routes)
    names = [route.name for route in load_config("rules.yaml").policy.routes]
    assert names == ["ct", "mr", "rest"]


def test_the_example_rules_file_loads(tmp_path: Path) -> None:
    example = (REPO / "rules" / "example.yaml").read_text()
    rules = tmp_path / "rules" / "example.yaml"
    rules.parent.mkdir()
    shutil.copy(REPO / "rules" / "example.yaml", rules)
    # Only uncommented paths are needed; the loader checks readability, not PEM content.
    needed = re.findall(r"^\s+\w+: (\.\./certs/\S+)", example, flags=re.MULTILINE)
    assert len(needed) >= 7
    touch(rules.parent, *needed)

    config = load_config(rules)

    assert [listener.name for listener in config.listeners] == ["modalities", "remote-site"]
    assert config.listeners[1].tls is not None
    assert config.listeners[1].tls.cert == tmp_path / "certs" / "fw-server.pem"
    assert config.upstream("pacs").tls is not None
    assert config.upstream("legacy-pacs").tls is None
    assert any(peer.certificate is not None for peer in config.policy.peers)
    move_rules = [r for route in config.policy.routes for r in route.allow if r.move_destinations]
    assert move_rules and "C-MOVE" in move_rules[0].services
    assert "modalities-to-pacs" in describe(config)


# -- one mistake, one exact message ----------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param(
            "    bind: 0.0.0.0:11112",
            "    bnid: 0.0.0.0:11112",
            [
                "rules.yaml:2: listeners[0]: missing required key 'bind'",
                "rules.yaml:3: listeners[0].bnid: unknown key 'bnid' (allowed: name, bind, tls, "
                "proxy_protocol, proxy_from, limits, mode); did you mean 'bind'?",
            ],
            id="unknown key",
        ),
        pytest.param(
            "routes:",
            "modus: enforce\nroutes:",
            [
                "rules.yaml:9: modus: unknown key 'modus' (allowed: mode, validation, listeners, "
                "upstreams, peers, routes, limits, metrics, audit, workers, instance); "
                "did you mean 'mode'?",
            ],
            id="unknown top-level key",
        ),
        pytest.param(
            "    networks: [10.1.2.0/24]",
            "    networks: [10.1.2.0/24]\n    ae_title: CT02",
            ["rules.yaml:9: peers[0].ae_title: duplicate key 'ae_title' (first given on line 7)"],
            id="duplicate key",
        ),
        pytest.param(
            "[10.1.2.0/24]",
            "[10.1.2.0/24, 10.1.2.300/24]",
            [
                "rules.yaml:8: peers[0].networks[1]: '10.1.2.300/24' is not an IP network "
                "(expected e.g. 10.1.2.0/24, 2001:db8::/32 or a single address)"
            ],
            id="bad CIDR",
        ),
        pytest.param(
            "[10.1.2.0/24]",
            "[10.1.2.3/24]",
            [
                "rules.yaml:8: peers[0].networks[0]: '10.1.2.3/24' has host bits set "
                "(did you mean 10.1.2.0/24?)"
            ],
            id="host bits set",
        ),
        pytest.param(
            "[CTImageStorage]",
            "[CTImageStorage, CTImageStorag]",
            [
                "rules.yaml:15: routes[0].allow[0].sop_classes[1]: unknown SOP Class keyword "
                "'CTImageStorag' (use a PS3.6 keyword or a UID)"
            ],
            id="unknown SOP class keyword",
        ),
        pytest.param(
            "[CTImageStorage]",
            "[ExplicitVRLittleEndian]",
            [
                "rules.yaml:15: routes[0].allow[0].sop_classes[0]: 'ExplicitVRLittleEndian' "
                "is a Transfer Syntax, not a SOP Class"
            ],
            id="transfer syntax keyword as SOP class",
        ),
        pytest.param(
            "[CTImageStorage]",
            "[CTImageStorage]\n        transfer_syntaxes: [CTImageStorage]",
            [
                "rules.yaml:16: routes[0].allow[0].transfer_syntaxes[0]: 'CTImageStorage' "
                "is a SOP Class, not a Transfer Syntax"
            ],
            id="SOP class keyword as transfer syntax",
        ),
        pytest.param(
            "[C-ECHO, C-STORE]",
            "[C-ECHO, c-store]",
            [
                "rules.yaml:14: routes[0].allow[0].services[1]: unknown service 'c-store' "
                "(one of C-STORE, C-GET, C-FIND, C-MOVE, C-ECHO, N-EVENT-REPORT, N-GET, N-SET, "
                "N-ACTION, N-CREATE, N-DELETE); did you mean 'C-STORE'?"
            ],
            id="unknown service",
        ),
        pytest.param(
            "    networks: [10.1.2.0/24]",
            "    networks: 10.1.2.0/24",
            ["rules.yaml:8: peers[0].networks: expected a list, got a string ('10.1.2.0/24')"],
            id="wrong type: string for list",
        ),
        pytest.param(
            "port: 104",
            'port: "104"',
            [
                "rules.yaml:5: upstreams.pacs.port: expected an integer, got a string ('104') "
                "(write it without quotes)"
            ],
            id="wrong type: quoted integer",
        ),
        pytest.param(
            "port: 104}",
            'port: 104, tls: "false"}',
            [
                "rules.yaml:5: upstreams.pacs.tls: expected false or a mapping with at least ca, "
                "got a string ('false')",
            ],
            id="wrong type: quoted boolean",
        ),
        pytest.param(
            "  - ae_title: CT01",
            "  - ae_title: 1234",
            [
                "rules.yaml:7: peers[0].ae_title: expected a string, got an integer (1234); "
                'quote it: "1234"'
            ],
            id="wrong type: unquoted number as AE title",
        ),
        pytest.param(
            "port: 104",
            "port: 0",
            ["rules.yaml:5: upstreams.pacs.port: must be between 1 and 65535, got 0"],
            id="port out of range",
        ),
        pytest.param(
            "0.0.0.0:11112",
            "'::1:11112'",
            [
                "rules.yaml:3: listeners[0].bind: write IPv6 addresses in brackets, "
                "e.g. [::]:104, got '::1:11112'"
            ],
            id="IPv6 bind without brackets",
        ),
        pytest.param(
            "0.0.0.0:11112",
            "0.0.0.0",
            [
                "rules.yaml:3: listeners[0].bind: expected host:port such as 0.0.0.0:11112, "
                "got '0.0.0.0'"
            ],
            id="bind without port",
        ),
        pytest.param(
            "  - listener: modalities",
            "  - listener: modalitis",
            [
                "rules.yaml:10: routes[0].listener: 'modalitis' is not a defined listener "
                "(defined: modalities)"
            ],
            id="undefined listener",
        ),
        pytest.param(
            "    upstream: pacs",
            "    upstream: pacs2",
            [
                "rules.yaml:12: routes[0].upstream: 'pacs2' is not a defined upstream "
                "(defined: pacs)"
            ],
            id="undefined upstream",
        ),
        pytest.param(
            "    upstream: pacs",
            "    upstream: pacs\n    calling_ae: [CT01, MR01]",
            [
                "rules.yaml:13: routes[0].calling_ae[1]: 'MR01' is not a defined peer "
                "(defined: CT01)"
            ],
            id="undefined peer",
        ),
        pytest.param(
            "        sop_classes: [CTImageStorage]",
            "        move_destinations: [WS1]",
            [
                "rules.yaml:15: routes[0].allow[0].move_destinations: move_destinations only "
                "applies to C-MOVE, which this rule's services lack"
            ],
            id="move_destinations without C-MOVE",
        ),
        pytest.param(
            "  - ae_title: CT01",
            "  - ae_title: CT01_MODALITY_RM3",
            [
                "rules.yaml:7: peers[0].ae_title: AE title 'CT01_MODALITY_RM3' has 17 "
                "characters; the maximum is 16"
            ],
            id="AE title of 17 characters",
        ),
        pytest.param(
            "    called_ae: PACS",
            "    called_ae: 'PA\\CS'",
            [
                "rules.yaml:11: routes[0].called_ae: AE title 'PA\\\\CS' contains a backslash, "
                "which DICOM does not allow"
            ],
            id="AE title with backslash",
        ),
        pytest.param(
            "    called_ae: PACS",
            "    called_ae: '    '",
            ["rules.yaml:11: routes[0].called_ae: must not be empty or only spaces"],
            id="AE title of spaces",
        ),
        pytest.param(
            "    networks: [10.1.2.0/24]",
            "    networks: [10.1.2.0/24]\n    certificate: {fingerprint_sha256: 'AB:CD'}",
            [
                "rules.yaml:9: peers[0].certificate.fingerprint_sha256: expected a SHA-256 "
                "fingerprint: 64 hex digits, colons optional"
            ],
            id="short fingerprint",
        ),
        pytest.param(
            "    networks: [10.1.2.0/24]",
            "    networks: [10.1.2.0/24]\n    certificate: {}",
            [
                "rules.yaml:9: peers[0].certificate: give at least one of subject_cn, san_dns, "
                "san_uri, fingerprint_sha256"
            ],
            id="empty certificate binding",
        ),
        pytest.param(
            "  - name: modalities\n    bind: 0.0.0.0:11112\n",
            "  - name: modalities\n    bind: 0.0.0.0:11112\n"
            "  - name: modalities\n    bind: 0.0.0.0:11113\n",
            [
                "rules.yaml:4: listeners[1].name: duplicate listener name 'modalities' "
                "(first used on line 2)"
            ],
            id="duplicate listener name",
        ),
        pytest.param(
            "routes:",
            "  - {ae_title: ' CT01', networks: [10.9.0.0/16]}\nroutes:",
            [
                "rules.yaml:9: peers[1].ae_title: duplicate peer AE title 'CT01' "
                "(first used on line 7)"
            ],
            id="duplicate peer AE after stripping spaces",
        ),
        pytest.param(
            "routes:",
            "limits: {max_pdu_bytes: 1024, idle_seconds: 0, artim_seconds: true}\nroutes:",
            [
                "rules.yaml:9: limits.max_pdu_bytes: must be between 4096 and 67108864, got 1024",
                "rules.yaml:9: limits.artim_seconds: expected a number of seconds, "
                "got a boolean (true)",
                "rules.yaml:9: limits.idle_seconds: must be more than 0 and at most 86400 "
                "seconds, got 0",
            ],
            id="limits out of range",
        ),
        pytest.param(
            MINIMAL[MINIMAL.index("routes:") :],
            "routes: []\n",
            ["rules.yaml:9: routes: expected a non-empty list"],
            id="empty routes",
        ),
        pytest.param(
            "routes:\n",
            "unused:\n",
            [
                "rules.yaml:1: missing required key 'routes'",
                "rules.yaml:9: unused: unknown key 'unused' (allowed: mode, validation, "
                "listeners, upstreams, peers, routes, limits, metrics, audit, workers, instance)",
            ],
            id="missing section",
        ),
    ],
)
def test_a_mistake_is_reported_at_its_line_and_key(
    errors_of: Errors, old: str, new: str, expected: list[str]
) -> None:
    assert errors_of(edit(old, new)) == expected


def test_an_empty_file_gives_one_clear_error(errors_of: Errors) -> None:
    assert errors_of("# nothing here yet\n") == [
        "rules.yaml: the rules file is empty; it needs the sections listeners, upstreams, "
        "peers and routes (see rules/example.yaml)"
    ]


def test_a_yaml_syntax_error_gives_its_line(errors_of: Errors) -> None:
    assert errors_of(edit("[10.1.2.0/24]", "[10.1.2.0/24")) == [
        "rules.yaml:9: YAML syntax error: expected ',' or ']', but got ':'"
        " (while parsing a flow sequence on line 8)"
    ]


def test_a_missing_rules_file_is_a_config_error(in_tmp: Path) -> None:
    with pytest.raises(ConfigErrors, match=r"^nope\.yaml: cannot read: No such file"):
        load_config("nope.yaml")


def test_a_missing_certificate_file_names_the_key_and_the_path(
    errors_of: Errors, in_tmp: Path
) -> None:
    touch(in_tmp, "certs/fw.pem", "certs/ca.pem")
    text = edit(
        "    bind: 0.0.0.0:11112\n",
        "    bind: 0.0.0.0:11112\n"
        "    tls: {cert: certs/fw.pem, key: certs/fw.key, ca: certs/ca.pem}\n",
    )
    assert errors_of(text) == [
        f"rules.yaml:4: listeners[0].tls.key: file not found: {in_tmp.resolve()}/certs/fw.key"
    ]


def test_a_client_certificate_needs_its_key(errors_of: Errors, in_tmp: Path) -> None:
    touch(in_tmp, "ca.pem", "client.pem")
    text = edit("port: 104}", "port: 104, tls: {ca: ca.pem, cert: client.pem}}")
    assert errors_of(text) == [
        "rules.yaml:5: upstreams.pacs.tls: give both cert and key (a client certificate), "
        "or neither"
    ]


def test_an_unquoted_tls_version_is_refused_with_a_hint(errors_of: Errors, in_tmp: Path) -> None:
    touch(in_tmp, "ca.pem")
    text = edit("port: 104}", "port: 104, tls: {ca: ca.pem, min_version: 1.3}}")
    assert errors_of(text) == [
        'rules.yaml:5: upstreams.pacs.tls.min_version: write the version in quotes, "1.3" '
        "(YAML reads 1.3 as a number)"
    ]


def test_fingerprints_are_normalised_to_lowercase_hex(in_tmp: Path) -> None:
    colons = ":".join(["Ab"] * 32)
    text = edit(
        "    networks: [10.1.2.0/24]",
        f"    networks: [10.1.2.0/24]\n    certificate: {{fingerprint_sha256: '{colons}'}}",
    )
    (in_tmp / "rules.yaml").write_text(text)
    certificate = load_config("rules.yaml").policy.peers[0].certificate
    assert certificate == CertificateIdentity(fingerprint_sha256="ab" * 32)


def test_ae_titles_are_stored_without_padding_spaces(in_tmp: Path) -> None:
    (in_tmp / "rules.yaml").write_text(edit("called_ae: PACS", "called_ae: ' PACS  '"))
    assert load_config("rules.yaml").policy.routes[0].called_ae == "PACS"


ROUTES_FOR_PACS = """\
routes:
  - {name: a, listener: modalities, called_ae: PACS, upstream: pacs, CALLERS_A
     allow: [{services: [C-ECHO]}]}
  - {name: b, listener: modalities, called_ae: PACS, upstream: pacs, CALLERS_B
     allow: [{services: [C-ECHO]}]}
"""


@pytest.mark.parametrize(
    ("callers_a", "callers_b", "expected"),
    [
        pytest.param(
            "",
            "",
            "rules.yaml:12: routes[1]: ambiguous route: routes[0] (line 10) already takes every "
            "calling AE for called AE 'PACS' on listener 'modalities'; give the routes "
            "calling_ae lists that do not overlap",
            id="both for every peer",
        ),
        pytest.param(
            "calling_ae: [CT01],",
            "calling_ae: [CT01],",
            "rules.yaml:12: routes[1]: ambiguous route: routes[0] (line 10) already takes "
            "calling AE CT01 for called AE 'PACS' on listener 'modalities'",
            id="same caller",
        ),
        pytest.param(
            "",
            "calling_ae: [CT01],",
            "rules.yaml:12: routes[1]: unreachable route: routes[0] (line 10) already takes "
            "every calling AE for called AE 'PACS' on listener 'modalities'; move this more "
            "specific route above it",
            id="fallback first",
        ),
    ],
)
def test_two_routes_for_the_same_caller_are_refused(
    errors_of: Errors, callers_a: str, callers_b: str, expected: str
) -> None:
    routes = ROUTES_FOR_PACS.replace("CALLERS_A", callers_a).replace("CALLERS_B", callers_b)
    assert errors_of(MINIMAL.split("routes:\n")[0] + routes) == [expected]


def test_unnamed_routes_for_one_called_ae_need_names(errors_of: Errors) -> None:
    routes = ROUTES_FOR_PACS.replace("name: a, ", "").replace("name: b, ", "")
    routes = routes.replace("CALLERS_A", "calling_ae: [CT01],").replace("CALLERS_B", "")
    assert errors_of(MINIMAL.split("routes:\n")[0] + routes) == [
        "rules.yaml:12: routes[1]: duplicate route name 'modalities/PACS' (first used on "
        "line 10); routes for the same listener and called AE need a name each"
    ]


def test_every_problem_is_reported_in_one_pass_in_file_order(errors_of: Errors) -> None:
    text = MINIMAL
    for old, new in [
        ("bind: 0.0.0.0:11112", "bind: 0.0.0.0:70000"),
        ("[10.1.2.0/24]", "[10.1.2.1/24]"),
        ("called_ae: PACS", "called_ae: PACS_ARCHIVE_SERVER1"),
        ("[CTImageStorage]", "[CTImageStorag]"),
        ("routes:", "limits: {idle_second: 5}\nroutes:"),
    ]:
        text = edit(old, new, text)
    assert [error.split(": ")[0] + ": " + error.split(": ")[1] for error in errors_of(text)] == [
        "rules.yaml:3: listeners[0].bind",
        "rules.yaml:8: peers[0].networks[0]",
        "rules.yaml:9: limits.idle_second",
        "rules.yaml:12: routes[0].called_ae",
        "rules.yaml:16: routes[0].allow[0].sop_classes[0]",
    ]
