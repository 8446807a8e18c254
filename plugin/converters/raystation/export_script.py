"""Export treated plans from RayStation to the auxiliary PACS.

RayStation runs a script from its script database as ONE file, with no folder around it: load the
generated single file ``plugin/converters/raystation/rtharvest_raystation_export.py`` (this module and
``selection.py`` combined by :mod:`.bundle`; a test keeps it in sync), edit the settings in your copy and run
it in RayStation's CPython (3.6+) interpreter. This module is its source inside the package.

For each patient (``PATIENT_IDS``, or the patients of the treated-plan list, or the open patient) every
case's approved beam sets are selected (only those whose plan UID is in ``TREATED_PLANS`` when that file is
given: the harvester's manifest JSON/CSV, the MOSAIQ converter's report, or one UID per line); the patient
is saved; plan, structure set, planning examination, beam-set and beam doses and the registrations of the
planning examination are exported with ``case.ScriptableDicomExport``; precondition warnings are logged and
then overridden. A log line per patient goes to ``LOG_FILE`` (plan UIDs, never names or IDs) and a JSON
summary per run to ``SUMMARY_FILE``.

Nothing here imports RayStation's ``connect`` module at import time: the selection logic is tested outside
RayStation with fake objects (``tests/converters/test_raystation.py``).
"""

import json
import logging
import os

from .selection import Destination, export_patient, export_patients, load_treated_plans, summary_json

# --- settings (edit these) --------------------------------------------------------------------------------
#: A DICOM node configured in RayStation (Clinic Settings), e.g. the auxiliary PACS.
DESTINATION = Destination(title="AUXPACS")
#: The treated plans: the harvester's manifest (JSON or CSV), the MOSAIQ converter's report, or one UID per
#: line. Empty: every approved beam set of the patients is exported.
TREATED_PLANS = ""
#: Patients to export; empty: the patients of TREATED_PLANS, or else the patient open in RayStation.
PATIENT_IDS: "list" = []
LOG_FILE = os.path.join(os.path.expanduser("~"), "rtharvest-raystation-export.log")
SUMMARY_FILE = os.path.join(os.path.expanduser("~"), "rtharvest-raystation-export.json")


def main() -> int:
    """Run the export inside RayStation; returns the number of patients that failed."""
    from connect import get_current  # RayStation's scripting API: only inside RayStation

    logger = logging.getLogger("rtharvest.raystation")
    logger.setLevel(logging.INFO)
    handler = logging.FileHandler(LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    treated = load_treated_plans(TREATED_PLANS) if TREATED_PLANS else None
    patient_ids = list(PATIENT_IDS)
    if not patient_ids and treated is not None:
        patient_ids = sorted({p.patient_id for p in treated if p.patient_id})
    uids = None if treated is None else [p.plan_uid for p in treated]
    if patient_ids:
        outcomes = export_patients(get_current("PatientDB"), patient_ids, uids, DESTINATION, logger)
    else:  # the open patient only
        outcomes = [export_patient(get_current("Patient"), uids, DESTINATION, "", logger)]
    with open(SUMMARY_FILE, "w", encoding="utf-8") as out:
        json.dump(summary_json(outcomes), out, indent=2)
    failed = sum(1 for o in outcomes if o.error)
    logger.info("done: %d patient(s), %d failed; summary in %s", len(outcomes), failed, SUMMARY_FILE)
    return failed


if __name__ == "__main__":
    main()
