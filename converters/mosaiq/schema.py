"""The MOSAIQ tables the converter reads, with names spelled exactly as MOSAIQ spells them.

One definition serves the reader (queries) and the synthetic clinic (which creates a SQLite file with
these tables), so a SQLite file holding them is a valid source. Only the columns the converter uses are
declared; a real MOSAIQ database has many more, which SQLAlchemy Core ignores.

Sources of the names: pymedphys ``_mosaiq`` (its types map of Ident, Patient, Site, TxField,
TxFieldPoint, TrackTreatment, Staff) and open MOSAIQ export scripts (Dose_Hst, FLD_HST). The
``DCMStudy/DCMSeries/DCMInstance`` column names are **not** confirmed by any public source we could
check: they are an assumption kept here, in one place, to adjust against a real database.
``Dose_Hst.Fx_Number_InEffect`` (the per-site fraction number MOSAIQ assigns) is used when present.
"""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Float, Integer, LargeBinary, MetaData, SmallInteger, String, Table

metadata = MetaData()

Ident = Table(
    "Ident", metadata,
    Column("Pat_Id1", Integer), Column("IDA", String(20)), Column("Version", Integer),
)
Patient = Table(
    "Patient", metadata,
    Column("Pat_ID1", Integer, primary_key=True), Column("Last_Name", String(30)), Column("First_Name", String(30)),
    Column("MIddle_Name", String(30)), Column("Birth_DtTm", DateTime),
)
Site = Table(
    "Site", metadata,
    Column("SIT_ID", Integer, primary_key=True), Column("SIT_SET_ID", Integer), Column("Version", Integer),
    Column("Pat_ID1", Integer), Column("Site_Name", String(20)), Column("Dose_Tx", Float), Column("Dose_Ttl", Float),
    Column("Fractions", Integer), Column("Status_Enum", SmallInteger),
)
TxField = Table(
    "TxField", metadata,
    Column("FLD_ID", Integer, primary_key=True), Column("FLD_SET_ID", Integer), Column("Version", Integer),
    Column("Pat_ID1", Integer), Column("SIT_Set_ID", Integer), Column("Field_Label", String(6)),
    Column("Field_Name", String(80)), Column("Machine_ID_Staff_ID", Integer), Column("Meterset", Float),
    Column("MetersetUnit_Enum", SmallInteger), Column("Type_Enum", SmallInteger), Column("Modality_Enum", SmallInteger),
    Column("OriginalPlanUID", String(64)), Column("OriginalBeamName", String(64)),
    Column("OriginalBeamNumber", Integer),
)
TxFieldPoint = Table(
    "TxFieldPoint", metadata,
    Column("TFP_ID", Integer, primary_key=True), Column("FLD_ID", Integer), Column("Point", SmallInteger),
    Column("Index", Float), Column("A_Leaf_Set", LargeBinary), Column("B_Leaf_Set", LargeBinary),
    Column("Gantry_Ang", Float), Column("Coll_Ang", Float), Column("Energy", Float),
)
Dose_Hst = Table(
    "Dose_Hst", metadata,
    Column("DHS_ID", Integer, primary_key=True), Column("Pat_ID1", Integer), Column("SIT_ID", Integer),
    Column("FLD_ID", Integer), Column("Tx_DtTm", DateTime), Column("Fractions_Tx", Integer),
    Column("Fx_Number_InEffect", Integer), Column("Dose_Tx_Act", Float), Column("Machine_ID_Staff_ID", Integer),
    Column("Meterset", Float), Column("Termination_Status_Enum", SmallInteger),
    Column("Termination_Verify_Status_Enum", SmallInteger), Column("PartiallyTreated", SmallInteger),
    Column("Type_Enum", SmallInteger),
)
FLD_HST = Table(
    "FLD_HST", metadata,
    Column("FHS_ID", Integer, primary_key=True), Column("DHS_ID", Integer), Column("Meterset", Float),
    Column("Control_Points", Integer),
)
TxFieldPoint_Hst = Table(
    "TxFieldPoint_Hst", metadata,
    Column("TFH_ID", Integer, primary_key=True), Column("FHS_ID", Integer), Column("Point", SmallInteger),
    Column("Index", Float), Column("A_Leaf_Set", LargeBinary), Column("B_Leaf_Set", LargeBinary),
    Column("Gantry_Ang", Float), Column("Coll_Ang", Float),
)
TrackTreatment = Table(
    "TrackTreatment", metadata,
    Column("TTX_ID", Integer, primary_key=True), Column("DHS_ID", Integer), Column("WasQAMode", SmallInteger),
    Column("WasBeamComplete", SmallInteger),
)
Staff = Table(
    "Staff", metadata,
    Column("Staff_ID", Integer, primary_key=True), Column("Type", String(20)), Column("Last_Name", String(30)),
    Column("Machine_Type", SmallInteger),
)
DCMStudy = Table(
    "DCMStudy", metadata,
    Column("DCMStudy_ID", Integer, primary_key=True), Column("Pat_ID1", Integer),
    Column("StudyInstanceUID", String(64)),
)
DCMSeries = Table(
    "DCMSeries", metadata,
    Column("DCMSeries_ID", Integer, primary_key=True), Column("DCMStudy_ID", Integer),
    Column("SeriesInstanceUID", String(64)), Column("Modality", String(16)),
)
DCMInstance = Table(
    "DCMInstance", metadata,
    Column("DCMInstance_ID", Integer, primary_key=True), Column("DCMSeries_ID", Integer),
    Column("SOPInstanceUID", String(64)), Column("SOPClassUID", String(64)),
)

#: Without these there is nothing to convert: the run stops with a message naming the table.
REQUIRED = ("Ident", "Patient", "Site", "TxField", "Dose_Hst", "TrackTreatment", "Staff")
#: Without these the output degrades (a warning says how), the run goes on.
OPTIONAL = ("TxFieldPoint", "FLD_HST", "TxFieldPoint_Hst", "DCMStudy", "DCMSeries", "DCMInstance")
