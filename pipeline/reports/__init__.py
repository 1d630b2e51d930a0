"""Reports: free-text radiology reports → de-identified sections, sentences and groundings.
Pure library code; the build joins a report to its study on the driver, by keys only
(``pipeline/run/attach.py``), runs the second de-identification pass in the unit worker, and
writes the report caption and grounded region captions (``pipeline/captions/grounded.py``).

text_deid.py  the two de-identification passes: ``scrub`` (fixed patterns, on read) and
              ``scrub_known`` (the study's own names and IDs from its DICOM header)
tables.py     report tables (CSV / Parquet / JSON lines) and ``.txt`` reports → ``Report``
              under keyed ids (study UID, accession number, patient + date)
sections.py   section headers (findings, impression, ...) and sentence splitting
negation.py   vocabulary mentions in a sentence: side, NegEx negation, hedges
ground.py     every mention of every sentence of a report, with sentence ids
"""

from pipeline.reports.ground import Grounding, ground
from pipeline.reports.negation import Mention, mentions
from pipeline.reports.sections import sentences, split_sections
from pipeline.reports.tables import (
    REPORT_KEY_KINDS,
    Report,
    ReportTable,
    load_reports,
    read_report_file,
    report_key,
)
from pipeline.reports.text_deid import Known, scrub, scrub_known

__all__ = ["Grounding", "Known", "Mention", "REPORT_KEY_KINDS", "Report", "ReportTable", "ground",
           "load_reports", "mentions", "read_report_file", "report_key", "scrub", "scrub_known",
           "sentences", "split_sections"]
