"""The coded concepts pacsai writes into its SEG and SR objects, all from the standard.

Every concept is taken from :mod:`pydicom.sr.codedict` (DICOM PS3.16: SNOMED CT ``SCT``, DICOM
``DCM``, LOINC ``LN`` and UCUM units); none is made up here. Where the standard has no concept for
exactly what pacsai reports, the closest standard one is used and the choice is explained below.

============================  ================================  ==================================
What                          Concept                           Why
============================  ================================  ==================================
algorithm family              DCM 123110 Artificial             CID 7162 (Surface Processing
                              Intelligence                      Algorithm Family), the family
                                                                that Segment and TID 4019
                                                                algorithm identifications take.
volume of a segment           SCT 118565006 Volume              CID 7469 (Generic Intensity and
                                                                Size Measurements).
unit of a volume              UCUM ``cm3`` cubic centimeter     CID 7462 (Units of Volume
                                                                Measurement) has ``cm3`` and no
                                                                ``ml``; 1 cm3 = 1 ml, so the
                                                                value is the volume in
                                                                millilitres.
CT mean / SD inside segment   DCM 112031 Attenuation            CID 7469; the statistic is the
                              Coefficient, with Derivation      Derivation modifier (CID 7464
                              SCT 373098007 Mean or             General Region of Interest
                              SCT 386136009 Standard Deviation  Measurement Modifiers), the
                                                                pattern of dcmqi's TID 1500 CT
                                                                examples (which carry the wrong
                                                                value 122713 for it).
unit of CT values             UCUM ``[hnsf'U]`` Hounsfield      CID 7181.
                              unit
probability of a class        DCM 111012 Certainty of Finding   No context group of TID 1500
                                                                names a classifier's output
                                                                probability. 111012 is defined as
                                                                "the likelihood that the finding
                                                                detected is in fact the type of
                                                                finding identified" (CID 6048,
                                                                the CAD SR templates), which is
                                                                what a per-class probability
                                                                states. DCM 122157 "Probability"
                                                                is in no context group and
                                                                111047 is specific to cancer.
unit of a probability         UCUM ``%`` Percent                As CAD SR reports Certainty of
                                                                Finding (0 to 100).
presence of a class           SCT 52101004 Present /            CID 241 (Present-Absent Only); the
                              SCT 272519000 Absent              qualitative evaluation's concept
                                                                name is the finding itself.
observer type                 DCM 121007 Device                 CID 270 (Observer Type): the
                                                                report's observer is the model.
procedure reported            LN 25045-6 CT unspecified body    CID 100 (Quantitative Diagnostic
                              region, LN 25056-3 MRI ..., LN    Imaging Procedures); other
                              43468-8 XR ..., LN 44136-0 PET    modalities get SCT 363679005
                              ..., LN 49118-3 NM ...            Imaging procedure (also CID 100).
============================  ================================  ==================================
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode

from pacsai.inference.labels import Code

__all__ = [
    "ABSENT",
    "ALGORITHM_FAMILY",
    "ATTENUATION_COEFFICIENT",
    "CERTAINTY_OF_FINDING",
    "CUBIC_CENTIMETER",
    "DEVICE_OBSERVER",
    "HOUNSFIELD_UNIT",
    "MEAN",
    "PERCENT",
    "PRESENT",
    "STANDARD_DEVIATION",
    "VOLUME",
    "coded_concept",
    "procedure_code",
]


def _concept(code: PydicomCode) -> CodedConcept:
    return CodedConcept(code.value, code.scheme_designator, code.meaning)


def coded_concept(code: Code) -> CodedConcept:
    """A label's :class:`~pacsai.inference.labels.Code` as a highdicom coded concept.

    Parameters
    ----------
    code : pacsai.inference.labels.Code
        (CodeValue, CodingSchemeDesignator, CodeMeaning), PS3.3 8.8.

    Returns
    -------
    highdicom.sr.CodedConcept

    Raises
    ------
    TypeError
        If ``code`` is not a :class:`~pacsai.inference.labels.Code`.
    ValueError
        If highdicom refuses a value (an empty value, or a meaning over 64 characters).
    """
    if not isinstance(code, Code):
        raise TypeError(f"expected a pacsai.inference.labels.Code, got {type(code).__name__}")
    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


#: DCM 123110 "Artificial Intelligence" (CID 7162).
ALGORITHM_FAMILY = _concept(codes.cid7162.ArtificialIntelligence)
#: SCT 118565006 "Volume" (CID 7469).
VOLUME = _concept(codes.SCT.Volume)
#: UCUM ``cm3`` "cubic centimeter" (CID 7462): numerically millilitres.
CUBIC_CENTIMETER = _concept(codes.UCUM.CubicCentimeter)
#: DCM 112031 "Attenuation Coefficient" (CID 7469): the CT value statistics' concept.
ATTENUATION_COEFFICIENT = _concept(codes.DCM.AttenuationCoefficient)
#: SCT 373098007 "Mean" (CID 7464), a Derivation.
MEAN = _concept(codes.SCT.Mean)
#: SCT 386136009 "Standard Deviation" (CID 7464), a Derivation.
STANDARD_DEVIATION = _concept(codes.SCT.StandardDeviation)
#: UCUM ``[hnsf'U]`` "Hounsfield unit" (CID 7181).
HOUNSFIELD_UNIT = _concept(codes.UCUM.HounsfieldUnit)
#: DCM 111012 "Certainty of Finding" (CID 6048): a class probability, in percent.
CERTAINTY_OF_FINDING = _concept(codes.DCM.CertaintyOfFinding)
#: UCUM ``%`` "Percent" (CID 7181).
PERCENT = _concept(codes.UCUM.Percent)
#: DCM 121007 "Device" (CID 270 Observer Type).
DEVICE_OBSERVER = _concept(codes.cid270.Device)
#: SCT 52101004 "Present" (CID 241).
PRESENT = _concept(codes.SCT.Present)
#: SCT 272519000 "Absent" (CID 241).
ABSENT = _concept(codes.SCT.Absent)

_PROCEDURES = {
    "CT": _concept(codes.LN.CTUnspecifiedBodyRegion),
    "MR": _concept(codes.LN.MRIUnspecifiedBodyRegion),
    "CR": _concept(codes.LN.XRUnspecifiedBodyRegion),
    "DX": _concept(codes.LN.XRUnspecifiedBodyRegion),
    "PT": _concept(codes.LN.PETUnspecifiedBodyRegion),
    "NM": _concept(codes.LN.NMUnspecifiedBodyRegion),
}
_IMAGING_PROCEDURE = _concept(codes.SCT.ImagingProcedure)


def procedure_code(modality: str) -> CodedConcept:
    """The TID 1500 Procedure Reported for a study of ``modality`` (CID 100).

    Parameters
    ----------
    modality : str
        Modality (0008,0060) of the images the model read.

    Returns
    -------
    highdicom.sr.CodedConcept
        LOINC "<modality> unspecified body region" for CT, MR, CR/DX, PT and NM, else
        SCT 363679005 "Imaging procedure".
    """
    return _PROCEDURES.get(modality.strip().upper(), _IMAGING_PROCEDURE)
