"""Association set-up codec cost: dicomfw's A-ASSOCIATE-RQ walk vs pynetdicom's PDU classes.

Many modalities open one association per image, so decoding the request, filtering its
contexts and encoding what goes upstream is paid per image. The request measured here has
128 presentation contexts, as DCMTK's storescu proposes by default.

Run: python bench/bench_codec.py
"""

from __future__ import annotations

import sys
import timeit

from pynetdicom import StoragePresentationContexts
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)

from dicomfw.core import acse
from dicomfw.core.policy import AllowRule, Policy, Route

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


def request_with_128_contexts() -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "CT01"
    primitive.called_ae_title = "PACS"
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.276.0.7230010.3.0.3.6.7"
    primitive.user_information = [maximum, implementation]
    contexts = []
    for number, template in enumerate(StoragePresentationContexts[:128]):
        template.context_id = 2 * number + 1
        template.transfer_syntax = [EXPLICIT_LE, IMPLICIT_LE]
        contexts.append(template)
    primitive.presentation_context_definition_list = contexts
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def main() -> None:
    raw = request_with_128_contexts()
    ct = "1.2.840.10008.5.1.4.1.1.2"
    route = Route(
        "r", "front", "PACS", "pacs", (AllowRule(frozenset({"C-STORE"}), frozenset({ct})),)
    )

    def dicomfw_setup() -> bytes:
        rq = acse.decode_rq(raw)
        kept = tuple(
            c
            for c in rq.contexts
            if Policy.filter_context(
                route, c.context_id, c.abstract_syntax, c.transfer_syntaxes
            ).result
            == 0
        )
        return acse.encode_rq(rq, kept, 1 << 20)

    def pynetdicom_round_trip() -> bytes:
        pdu = A_ASSOCIATE_RQ()
        pdu.decode(raw)
        return bytes(pdu.encode())

    rows = []
    for name, function in (
        ("dicomfw: decode + filter 128 contexts + encode", dicomfw_setup),
        ("pynetdicom A_ASSOCIATE_RQ: decode + encode", pynetdicom_round_trip),
    ):
        runs = 200
        best = min(timeit.repeat(function, number=runs, repeat=5)) / runs
        rows.append((name, best))
    sys.stdout.write(f"A-ASSOCIATE-RQ with 128 presentation contexts ({len(raw)} bytes)\n")
    for name, seconds in rows:
        sys.stdout.write(f"  {name:<50} {seconds * 1e6:8.0f} µs\n")
    sys.stdout.write(f"  ratio pynetdicom / dicomfw: {rows[1][1] / rows[0][1]:.1f}x\n")


if __name__ == "__main__":
    main()
