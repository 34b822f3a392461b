"""`dicomfw check` as an admin runs it: on a checkout without certificates (--syntax-only), and
with the warnings about rules that load but do not do what was meant, each next to a near miss
that does not warn."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from dicomfw.pki import certs
from tests.admin_harness import dicomfw
from tests.harness import Pki

REPO = Path(__file__).resolve().parent.parent


def test_the_example_rules_pass_a_syntax_only_check_on_a_fresh_checkout(tmp_path: Path) -> None:
    """The example names certificates a checkout does not have: a full check fails on them,
    --syntax-only checks everything else and passes."""
    rules = tmp_path / "rules" / "example.yaml"
    rules.parent.mkdir()
    shutil.copy(REPO / "rules" / "example.yaml", rules)

    full = dicomfw("check", "--config", rules)
    assert full.returncode == 1
    assert "fw-server.pem: " not in full.stdout and "file not found" in full.stderr

    syntax = dicomfw("check", "--config", rules, "--syntax-only")
    assert syntax.returncode == 0, syntax.stderr
    assert syntax.stderr == ""
    assert syntax.stdout.endswith(f"{rules}: OK\n")


def test_syntax_only_still_reports_every_other_mistake(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    example = (REPO / "rules" / "example.yaml").read_text()
    rules.write_text(example.replace("networks: [10.1.2.0/24]", "networks: [10.1.2.300/24]"))
    result = dicomfw("check", "--config", rules, "--syntax-only")
    assert result.returncode == 1
    assert "is not an IP network" in result.stderr
    assert "file not found" not in result.stderr


# -- warnings --------------------------------------------------------------------------------

FIND = "StudyRootQueryRetrieveInformationModelFind"
MOVE = "StudyRootQueryRetrieveInformationModelMove"


def base_rules(pki: Pki) -> str:
    """Clean: no warning. Cases below edit it to make one, and nearly make one."""
    return f"""\
listeners:
  - {{name: front, bind: "127.0.0.1:11112"}}
  - name: secure
    bind: "127.0.0.1:11113"
    tls: {{cert: {pki.fw_server.cert}, key: {pki.fw_server.key}, ca: {pki.ca}}}
upstreams:
  pacs: {{host: 127.0.0.1, port: 104}}
peers:
  - {{ae_title: CT01, networks: [10.1.2.0/24]}}
  - {{ae_title: WS1, networks: [10.1.4.0/24]}}
  - {{ae_title: REMOTE, networks: [192.0.2.0/24], certificate: {{san_uri: "urn:dicom:ae:REMOTE"}}}}
routes:
  - name: store
    listener: front
    called_ae: PACS
    upstream: pacs
    calling_ae: [CT01]
    allow:
      - {{services: [C-ECHO, C-STORE], sop_classes: [CTImageStorage]}}
  - name: query
    listener: front
    called_ae: PACS
    upstream: pacs
    calling_ae: [WS1]
    allow:
      - services: [C-FIND, C-MOVE]
        sop_classes: [{FIND}, {MOVE}]
        move_destinations: [WS1]
  - name: remote
    listener: secure
    called_ae: PACS
    upstream: pacs
    calling_ae: [REMOTE]
    allow: [{{services: [C-ECHO]}}]
"""


Edits = list[tuple[str, str]]
ROUTES = "routes:\n"


def echo_route(listener: str, called_ae: str, extra: str = "") -> str:
    """A route that allows C-ECHO, as one line of the routes list."""
    return (
        f"  - {{listener: {listener}, called_ae: {called_ae}, upstream: pacs, {extra}"
        "allow: [{services: [C-ECHO]}]}\n"
    )


SPARE = ("upstreams:", '  - {name: spare, bind: "127.0.0.1:11114"}\nupstreams:')
FALLBACK = echo_route("front", "PACS", "name: rest, ")
MR01 = "  - {ae_title: MR01, networks: [10.1.3.0/24]}\n"


def edited(text: str, edits: Edits) -> str:
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def add_route(route: str) -> Edits:
    return [("    allow: [{services: [C-ECHO]}]\n", "    allow: [{services: [C-ECHO]}]\n" + route)]


#: warning -> (edits that cause it, a line of the edited file it is reported at, what it says,
#: edits that nearly cause it and do not)
WARNINGS: dict[str, tuple[Edits, str, str, Edits]] = {
    "a listener with no route": (
        [SPARE],
        "name: spare",
        "listener 'spare' has no route: every association to it is refused (called AE not "
        "recognized)",
        [SPARE, *add_route(echo_route("spare", "PACS"))],
    ),
    "a route shadowed by earlier ones": (
        add_route(FALLBACK),
        "name: rest",
        "route 'rest' can never match: earlier routes (line 13, 20) take CT01, WS1 first; REMOTE "
        "must present a certificate, which plain listener 'front' never has",
        [(ROUTES, MR01 + ROUTES), *add_route(FALLBACK)],
    ),
    "a route for certificate-bound peers on a plain listener": (
        add_route(echo_route("front", "ARCHIVE", "calling_ae: [REMOTE], ")),
        "called_ae: ARCHIVE",
        "route 'front/ARCHIVE' can never match: REMOTE must present a certificate, which plain "
        "listener 'front' never has",
        add_route(echo_route("secure", "ARCHIVE", "calling_ae: [REMOTE], ")),
    ),
    "a peer no route admits": (
        [(ROUTES, MR01 + ROUTES)],
        "ae_title: MR01",
        "no route admits peer 'MR01': every association it makes is refused",
        [(ROUTES, MR01 + ROUTES), ("calling_ae: [CT01]", "calling_ae: [CT01, MR01]")],
    ),
    "one AE title on overlapping networks": (
        [("[10.1.2.0/24]", "[10.1.2.0/24, 10.1.2.7]")],
        "ae_title: CT01",
        "peer 'CT01' lists 10.1.2.0/24 and 10.1.2.7/32, which overlap: the narrower one adds "
        "nothing",
        [("[10.1.2.0/24]", "[10.1.2.0/24, 10.1.3.7]")],
    ),
    "the same AE title in another case on overlapping networks": (
        [
            (ROUTES, "  - {ae_title: ct01, networks: [10.1.2.128/25]}\n" + ROUTES),
            ("calling_ae: [CT01]", "calling_ae: [CT01, ct01]"),
        ],
        "ae_title: ct01",
        "peers 'CT01' (rules.yaml:9) and 'ct01' are the same AE title in another case, on "
        "overlapping networks",
        [
            (ROUTES, "  - {ae_title: ct01, networks: [10.9.0.0/16]}\n" + ROUTES),
            ("calling_ae: [CT01]", "calling_ae: [CT01, ct01]"),
        ],
    ),
    "SOP classes without pixel data with only compressed transfer syntaxes": (
        [
            (
                "        move_destinations: [WS1]",
                "        move_destinations: [WS1]\n"
                "        transfer_syntaxes: [JPEG2000Lossless, JPEGLSLossless]",
            )
        ],
        "- services: [C-FIND, C-MOVE]",
        f"{FIND}, {MOVE}: this rule allows only compressed transfer syntaxes (JPEG2000Lossless, "
        "JPEGLSLossless), which no modality proposes for objects without pixel data; their "
        "contexts are always refused",
        [
            (
                "[C-ECHO, C-STORE], sop_classes: [CTImageStorage]}",
                "[C-STORE], sop_classes: [CTImageStorage], transfer_syntaxes: [JPEG2000Lossless]}",
            )
        ],
    ),
    "an unknown move destination": (
        [("move_destinations: [WS1]", "move_destinations: [WS1, EVIL]")],
        "- services: [C-FIND, C-MOVE]",
        "move destination EVIL is neither a peer nor an AE title the firewall routes to: a typo, "
        "or a node these rules do not know",
        [("move_destinations: [WS1]", "move_destinations: [WS1, PACS]")],
    ),
}


def line_of(text: str, marker: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if marker in line)


def warnings_of(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if ": warning: " in line]


def check_in(directory: Path, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    (directory / "rules.yaml").write_text(text)
    return dicomfw("check", "--config", "rules.yaml", *args, cwd=directory)


def test_the_base_rules_have_no_warning(tmp_path: Path, pki: Pki) -> None:
    result = check_in(tmp_path, base_rules(pki))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.endswith("rules.yaml: OK\n")


@pytest.mark.parametrize("warning", WARNINGS)
def test_each_warning_has_its_line_and_a_near_miss_gets_none(
    tmp_path: Path, pki: Pki, warning: str
) -> None:
    edits, marker, message, near_miss = WARNINGS[warning]
    text = edited(base_rules(pki), edits)
    result = check_in(tmp_path, text, "--syntax-only")
    assert result.returncode == 0, result.stderr
    assert warnings_of(result) == [f"rules.yaml:{line_of(text, marker)}: warning: {message}"]
    assert result.stdout.endswith("rules.yaml: OK (1 warning(s))\n")
    assert check_in(tmp_path, text, "--syntax-only", "--strict").returncode == 1

    nearly = check_in(tmp_path, edited(base_rules(pki), near_miss), "--syntax-only", "--strict")
    assert (nearly.returncode, nearly.stderr) == (0, "")


def test_a_calling_ae_naming_no_peer_is_already_an_error(tmp_path: Path, pki: Pki) -> None:
    text = edited(base_rules(pki), [("calling_ae: [CT01]", "calling_ae: [CT01, MR01]")])
    result = check_in(tmp_path, text, "--syntax-only")
    assert result.returncode == 1
    assert "routes[0].calling_ae[1]: 'MR01' is not a defined peer" in result.stderr


def test_a_certificate_that_expires_within_30_days_is_a_warning(tmp_path: Path, pki: Pki) -> None:
    soon = certs.issue(pki.ca_dir, "soon", "server", tmp_path / "soon", ["localhost"], days=10)
    later = certs.issue(pki.ca_dir, "later", "server", tmp_path / "later", ["localhost"], days=60)
    for pair, warned in ((soon, True), (later, False)):
        text = base_rules(pki).replace(str(pki.fw_server.cert), str(pair.cert))
        text = text.replace(str(pki.fw_server.key), str(pair.key))
        result = check_in(tmp_path, text)
        assert result.returncode == 0, result.stderr
        expected = f"rules.yaml:5: warning: {pair.cert}: certificate CN=soon expires on "
        assert [w.startswith(expected) for w in warnings_of(result)] == ([True] if warned else [])
        skipped = check_in(tmp_path, text, "--syntax-only")  # certificate files are not opened
        assert warnings_of(skipped) == []


def test_diff_lists_what_a_change_newly_allows_and_newly_refuses(tmp_path: Path, pki: Pki) -> None:
    old = base_rules(pki)
    new = edited(
        old,
        [
            ("[10.1.2.0/24]", "[10.1.0.0/16]"),  # a wider network
            (ROUTES, MR01 + ROUTES),  # a new peer ...
            ("calling_ae: [CT01]", "calling_ae: [CT01, MR01]"),  # ... admitted
            ("sop_classes: [CTImageStorage]", "sop_classes: [MRImageStorage]"),
            ("move_destinations: [WS1]", "move_destinations: [WS1, EVIL]"),
            ("    calling_ae: [REMOTE]\n", "    calling_ae: [REMOTE]\n    mode: monitor\n"),
        ],
    )
    (tmp_path / "old.yaml").write_text(old)
    (tmp_path / "new.yaml").write_text(new)
    result = dicomfw("check", "--diff", "old.yaml", "new.yaml", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        "new.yaml newly allows:",
        "  new.yaml:9: peer CT01 from 10.1.0.0/16 except 10.1.2.0/24",
        "  new.yaml:12: peer MR01 from 10.1.3.0/24",
        "  new.yaml:14: route store for MR01",
        "  new.yaml:20: route store: C-STORE of MRImageStorage",
        f"  new.yaml:27: route query: C-MOVE of {FIND} to EVIL",
        f"  new.yaml:27: route query: C-MOVE of {MOVE} to EVIL",
        "  new.yaml:30: route remote in monitor mode: what its rules refuse passes",
        "new.yaml newly refuses:",
        "  old.yaml:19: route store: C-STORE of CTImageStorage",
    ]


def test_diff_of_a_file_with_itself_changes_nothing(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "rules.yaml").write_text(base_rules(pki))
    both = check_in(tmp_path, base_rules(pki), "--diff", "rules.yaml", "rules.yaml")
    assert both.returncode == 2
    assert "give --config FILE, or --diff OLD NEW" in both.stderr
    same = dicomfw("check", "--diff", "rules.yaml", "rules.yaml", cwd=tmp_path)
    assert same.stdout == "rules.yaml allows and refuses what rules.yaml does.\n"
