"""Query/Retrieve and Modality Worklist identifiers: levels, keys, universal matching.

A C-FIND identifier asks for matches; a C-MOVE or C-GET identifier names what to send. Both
are data sets whose meaning comes from their information model (PS3.4 §C.6, Annex K), so the
firewall checks them against it:

* ``query_level``: Query/Retrieve Level (0008,0052) is present and one the model has
  (PS3.4 §C.6.1: Patient Root PATIENT/STUDY/SERIES/IMAGE, §C.6.2: Study Root STUDY/SERIES/IMAGE,
  §C.6.3: Patient/Study Only PATIENT/STUDY).
* ``query_keys``: hierarchical queries (PS3.4 §C.4.1.2.1: no relational-query extended
  negotiation is seen by the firewall) carry no key of a level below the Query/Retrieve Level.
  A key's level is the one PS3.4 Tables C.6-1 to C.6-5 list it at; an attribute those tables do
  not list ("all other attributes at the level") has no level here and is allowed, so real
  viewers' extra return keys pass. A C-MOVE/C-GET identifier (PS3.4 §C.4.2.2.1, §C.4.3.2.1)
  holds only the unique keys of its level and the levels above (Patient ID, Study, Series,
  SOP Instance UID) plus the Query/Retrieve Level, Specific Character Set, Query/Retrieve View
  and Timezone Offset From UTC; the unique key of its level is present and specific (a
  universal value would retrieve everything). Patient ID is accepted in Study Root retrieves
  too: widely used SCUs send it, and it can only narrow what is sent.
* Modality Worklist (PS3.4 §K.6, Table K.6-1): top-level keys and the keys of Scheduled
  Procedure Step Sequence items come from the table; other sequences' items (codes) are not
  held to it. Every value's characters must be legal for its key's VR
  (``worklist_characters``, ``dicomfw.core.values.query_characters_problem``).
* ``universal_match``: a route names keys, per level ("WORKLIST" for Modality Worklist),
  that may not match universally. A key matches universally when its value is empty or only
  ``*`` characters (PS3.4 §C.2.2.2.3, §C.2.2.2.4), and also when it is absent: an absent key
  constrains nothing, so ``PatientID=*`` and no PatientID at all are the same bulk query.
"""

from __future__ import annotations

from typing import Final

from dicomfw.core.dictionary import keyword_tag

PATIENT: Final = 0
STUDY: Final = 1
SERIES: Final = 2
IMAGE: Final = 3
LEVEL_NAMES: Final = ("PATIENT", "STUDY", "SERIES", "IMAGE")
WORKLIST_LEVEL: Final = "WORKLIST"

QUERY_RETRIEVE_LEVEL: Final = 0x00080052
SPECIFIC_CHARACTER_SET: Final = 0x00080005
SCHEDULED_PROCEDURE_STEP_SEQUENCE: Final = 0x00400100

MODALITY_WORKLIST: Final = "1.2.840.10008.5.1.4.31"
_PATIENT_ROOT: Final = (PATIENT, STUDY, SERIES, IMAGE)
_STUDY_ROOT: Final = (STUDY, SERIES, IMAGE)
_PATIENT_STUDY_ONLY: Final = (PATIENT, STUDY)
#: Q/R abstract syntaxes (PS3.4 Table C.4-1 and B.5-1) -> (levels, is a retrieve).
MODELS: Final[dict[str, tuple[tuple[int, ...], bool]]] = {
    "1.2.840.10008.5.1.4.1.2.1.1": (_PATIENT_ROOT, False),
    "1.2.840.10008.5.1.4.1.2.1.2": (_PATIENT_ROOT, True),
    "1.2.840.10008.5.1.4.1.2.1.3": (_PATIENT_ROOT, True),
    "1.2.840.10008.5.1.4.1.2.2.1": (_STUDY_ROOT, False),
    "1.2.840.10008.5.1.4.1.2.2.2": (_STUDY_ROOT, True),
    "1.2.840.10008.5.1.4.1.2.2.3": (_STUDY_ROOT, True),
    "1.2.840.10008.5.1.4.1.2.3.1": (_PATIENT_STUDY_ONLY, False),
    "1.2.840.10008.5.1.4.1.2.3.2": (_PATIENT_STUDY_ONLY, True),
    "1.2.840.10008.5.1.4.1.2.3.3": (_PATIENT_STUDY_ONLY, True),
}


def _tags(keywords: str) -> frozenset[int]:
    return frozenset(keyword_tag(keyword) for keyword in keywords.split())


#: PS3.4 Table C.6-1/C.6-5 (Patient level), C.6-2/C.6-5 (Study), C.6-3 (Series), C.6-4 (Image).
_LEVEL_KEYS: Final = (
    _tags(
        "PatientName PatientID IssuerOfPatientID IssuerOfPatientIDQualifiersSequence "
        "ReferencedPatientSequence PatientBirthDate PatientBirthTime PatientSex "
        "OtherPatientIDsSequence OtherPatientNames EthnicGroup PatientComments "
        "NumberOfPatientRelatedStudies NumberOfPatientRelatedSeries "
        "NumberOfPatientRelatedInstances"
    ),
    _tags(
        "StudyDate StudyTime AccessionNumber StudyID StudyInstanceUID ReferringPhysicianName "
        "StudyDescription ProcedureCodeSequence NameOfPhysiciansReadingStudy "
        "AdmittingDiagnosesDescription ReferencedStudySequence PatientAge PatientSize "
        "PatientWeight Occupation AdditionalPatientHistory NumberOfStudyRelatedSeries "
        "NumberOfStudyRelatedInstances ModalitiesInStudy SOPClassesInStudy "
        "IssuerOfAccessionNumberSequence"
    ),
    _tags(
        "Modality SeriesNumber SeriesInstanceUID NumberOfSeriesRelatedInstances "
        "SeriesDescription SeriesDate SeriesTime BodyPartExamined Laterality ProtocolName "
        "PerformedProcedureStepStartDate PerformedProcedureStepStartTime "
        "RequestAttributesSequence"
    ),
    _tags(
        "InstanceNumber SOPInstanceUID SOPClassUID ContentDate ContentTime "
        "AlternateRepresentationSequence RelatedGeneralSOPClassUID ConceptNameCodeSequence "
        "NumberOfFrames Rows Columns BitsAllocated ImageType AcquisitionNumber"
    ),
)
#: Each listed key's level (its lowest listing wins: none is listed twice).
KEY_LEVEL: Final[dict[int, int]] = {
    tag: level for level, keys in enumerate(_LEVEL_KEYS) for tag in keys
}
#: The unique key of each level (PS3.4 §C.6.1.1, §C.6.2.1).
UNIQUE_KEYS: Final = (
    keyword_tag("PatientID"),
    keyword_tag("StudyInstanceUID"),
    keyword_tag("SeriesInstanceUID"),
    keyword_tag("SOPInstanceUID"),
)
#: What a retrieve identifier may hold besides unique keys (PS3.4 §C.4.2.1.4, §C.4.3.1.3).
RETRIEVE_EXTRAS: Final = _tags(
    "QueryRetrieveLevel SpecificCharacterSet QueryRetrieveView TimezoneOffsetFromUTC"
)

#: PS3.4 Table K.6-1: the top-level Modality Worklist keys (matching and return keys).
WORKLIST_KEYS: Final = _tags(
    # SOP Common, Patient Identification / Demographic / Medical, Visit
    "SpecificCharacterSet TimezoneOffsetFromUTC PatientName PatientID IssuerOfPatientID "
    "IssuerOfPatientIDQualifiersSequence OtherPatientIDsSequence OtherPatientNames "
    "PatientBirthDate PatientBirthTime PatientSex PatientAge PatientWeight PatientSize "
    "ConfidentialityConstraintOnPatientDataDescription PatientState PregnancyStatus "
    "MedicalAlerts Allergies SpecialNeeds PatientComments EthnicGroup AdditionalPatientHistory "
    "LastMenstrualDate ReferencedPatientSequence AdmissionID IssuerOfAdmissionIDSequence "
    "CurrentPatientLocation AdmittingDiagnosesDescription PatientInstitutionResidence "
    "RouteOfAdmissions InstitutionName InstitutionAddress InstitutionCodeSequence "
    "ReferencedVisitSequence PatientTransportArrangements "
    # Scheduled Procedure Step, Requested Procedure, Imaging Service Request
    "ScheduledProcedureStepSequence RequestedProcedureID RequestedProcedureDescription "
    "RequestedProcedureCodeSequence RequestedProcedurePriority ReasonForTheRequestedProcedure "
    "ReasonForRequestedProcedureCodeSequence RequestedProcedureComments "
    "RequestedProcedureLocation StudyInstanceUID StudyDate StudyTime ReferencedStudySequence "
    "AccessionNumber IssuerOfAccessionNumberSequence RequestingPhysician "
    "RequestingPhysicianIdentificationSequence ReferringPhysicianName "
    "ReferringPhysicianIdentificationSequence RequestingService "
    "RequestingServiceCodeSequence PlacerOrderNumberImagingServiceRequest "
    "FillerOrderNumberImagingServiceRequest OrderPlacerIdentifierSequence "
    "OrderFillerIdentifierSequence ImagingServiceRequestComments IssueDateOfImagingServiceRequest "
    "IssueTimeOfImagingServiceRequest OrderEnteredBy OrderEntererLocation OrderCallbackPhoneNumber "
    "ConfidentialityCode NamesOfIntendedRecipientsOfResults "
    "StudyDescription Modality"
)
#: PS3.4 Table K.6-1: the keys of a Scheduled Procedure Step Sequence item.
SCHEDULED_STEP_KEYS: Final = _tags(
    "ScheduledStationAETitle ScheduledProcedureStepStartDate ScheduledProcedureStepStartTime "
    "ScheduledProcedureStepEndDate ScheduledProcedureStepEndTime Modality "
    "ScheduledPerformingPhysicianName ScheduledPerformingPhysicianIdentificationSequence "
    "ScheduledProcedureStepDescription ScheduledProtocolCodeSequence ScheduledProcedureStepID "
    "ScheduledProcedureStepStatus ScheduledStationName ScheduledProcedureStepLocation "
    "PreMedication RequestedContrastAgent CommentsOnTheScheduledProcedureStep "
    "ScheduledStationNameCodeSequence ScheduledStationClassCodeSequence "
    "ScheduledStationGeographicLocationCodeSequence AnatomicalOrientationType "
    "ScheduledSpecimenSequence SpecificCharacterSet"
)


def is_universal(value: bytes) -> bool:
    """PS3.4 §C.2.2.2.3/4: an empty value, or one of only ``*``, matches every value."""
    return not value.rstrip(b"\x00 ").replace(b"*", b"")


def level_of(value: bytes) -> str:
    """The Query/Retrieve Level as written (padding stripped)."""
    return value.strip(b"\x00 ").decode("ascii", "replace")


def key_problem(tag: int, level: int, retrieve: bool) -> str | None:
    """Why a top-level key is not allowed in an identifier at ``level``, or None."""
    if retrieve:
        if tag in RETRIEVE_EXTRAS or (tag in UNIQUE_KEYS and UNIQUE_KEYS.index(tag) <= level):
            return None
        if tag == UNIQUE_KEYS[PATIENT]:
            return None  # Study Root retrieves: see the module docstring
        return "is not a unique key of the retrieve's level or above"
    key_level = KEY_LEVEL.get(tag, -1)
    if key_level > level:
        return f"is a {LEVEL_NAMES[key_level]} key below the {LEVEL_NAMES[level]} level"
    return None
