"""The MOSAIQ tables the converter reads, with names spelled exactly as MOSAIQ spells them.

One definition serves the reader (queries) and the synthetic clinic (which creates a SQLite file with
these tables), so a SQLite file holding them is a valid source. Only the columns the converter uses are
declared; a real MOSAIQ database has many more, which SQLAlchemy Core ignores.

Sources of the names: pymedphys ``_mosaiq`` (its types map of Ident, Patient, Site, TxField,
TxFieldPoint, TrackTreatment, Staff) and open MOSAIQ export scripts (Dose_Hst, FLD_HST). The
``DCMStudy/DCMSeries/DCMInstance`` column names are **not** confirmed by any public source we could
check: they are an assumption kept here, in one place, to adjust against a real database.
``Dose_Hst.Fx_Number_InEffect`` (the fraction number MOSAIQ assigns) is used when present.
``TxFieldPoint.MLC_Leaves`` (pymedphys' types map: smallint) is the number of leaves per bank; the leaf
blobs are fixed-width records of which only the first ``MLC_Leaves`` values are leaves (pymedphys
``_mosaiq/delivery.py``, ``decode_msq_mlc``). It is optional here: without it the whole blob is read.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Column, DateTime, Dialect, Float, Integer, LargeBinary, MetaData, SmallInteger, String, Table
from sqlalchemy.types import TypeDecorator, TypeEngine


class LocalDateTime(TypeDecorator[Any]):
    """MOSAIQ's ``datetime`` columns: local time without zone.

    SQL Server drivers return ``datetime`` objects. SQLite has no date type: a copy or a test database may
    hold ISO text with a space or a ``T`` separator, with or without fractions; all of them are read
    here (SQLAlchemy's own SQLite DateTime accepts only its own format). Text that is no date comes back
    unchanged, for the reader to report with its row. A zone, if any, is dropped: MOSAIQ times are local.
    """

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        return dialect.type_descriptor(String(32) if dialect.name == "sqlite" else DateTime())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if dialect.name == "sqlite" and isinstance(value, datetime):
            return value.isoformat(sep=" ")
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value.strip())
            except ValueError:
                return value
        if isinstance(value, datetime) and value.tzinfo is not None:
            value = value.replace(tzinfo=None)
        return value


metadata = MetaData()

Ident = Table(
    "Ident", metadata,
    Column("Pat_Id1", Integer), Column("IDA", String(20)), Column("Version", Integer),
)
Patient = Table(
    "Patient", metadata,
    Column("Pat_ID1", Integer, primary_key=True), Column("Last_Name", String(30)), Column("First_Name", String(30)),
    Column("MIddle_Name", String(30)), Column("Birth_DtTm", LocalDateTime),
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
    Column("FLD_ID", Integer), Column("Point", SmallInteger),
    Column("Index", Float), Column("MLC_Leaves", SmallInteger), Column("A_Leaf_Set", LargeBinary),
    Column("B_Leaf_Set", LargeBinary), Column("Gantry_Ang", Float), Column("Coll_Ang", Float), Column("Energy", Float),
)
Dose_Hst = Table(
    "Dose_Hst", metadata,
    Column("DHS_ID", Integer, primary_key=True), Column("Pat_ID1", Integer), Column("SIT_ID", Integer),
    Column("FLD_ID", Integer), Column("Tx_DtTm", LocalDateTime), Column("Fractions_Tx", Integer),
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
    Column("FHS_ID", Integer), Column("Point", SmallInteger),
    Column("Index", Float), Column("A_Leaf_Set", LargeBinary), Column("B_Leaf_Set", LargeBinary),
    Column("Gantry_Ang", Float), Column("Coll_Ang", Float),
)
TrackTreatment = Table(
    "TrackTreatment", metadata,
    Column("DHS_ID", Integer), Column("WasQAMode", SmallInteger),
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

#: Columns without which a table is unusable. A required table lacking one stops the run; an optional
#: one is then treated as absent. Any other declared column may be missing: it reads as NULL (warned).
KEY_COLUMNS: dict[str, tuple[str, ...]] = {
    "Ident": ("Pat_Id1", "IDA"),
    "Patient": ("Pat_ID1",),
    "Site": ("SIT_ID", "Pat_ID1"),
    "TxField": ("FLD_ID", "SIT_Set_ID", "OriginalPlanUID", "OriginalBeamNumber", "Type_Enum"),
    "Dose_Hst": ("DHS_ID", "Pat_ID1", "FLD_ID", "Tx_DtTm"),
    "TrackTreatment": ("DHS_ID", "WasQAMode"),
    "Staff": ("Staff_ID", "Last_Name"),
    "TxFieldPoint": ("FLD_ID", "Point"),
    "FLD_HST": ("FHS_ID", "DHS_ID"),
    "TxFieldPoint_Hst": ("FHS_ID", "Point"),
    "DCMStudy": ("DCMStudy_ID", "StudyInstanceUID"),
    "DCMSeries": ("DCMSeries_ID", "DCMStudy_ID", "SeriesInstanceUID"),
    "DCMInstance": ("DCMSeries_ID", "SOPInstanceUID"),
}
