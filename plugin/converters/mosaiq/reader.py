"""Read deliveries from a MOSAIQ database through SQLAlchemy Core (SQL Server in production, SQLite in tests).

Every query uses the table objects of :mod:`.schema`, so SQLAlchemy quotes MOSAIQ's mixed-case names
for each dialect. Values are checked and typed here: a non-numeric enum or a malformed leaf blob
becomes a :class:`~.models.Problem` on the delivery that needs it (naming table, row and column), never
an exception that would stop other deliveries or patients.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from datetime import date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Engine, Table, and_, inspect, null, select
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.sql.elements import ColumnElement

from . import schema as s
from .models import (
    ControlPoint,
    Delivery,
    FieldType,
    FieldVersion,
    PatientInfo,
    PlanLocation,
    Problem,
    SiteInfo,
    TerminationStatus,
    VerifyStatus,
)


class MissingTable(RuntimeError):
    """A table the converter cannot work without is absent."""


class BadValue(ValueError):
    """One column of one row holds something the converter cannot use."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


#: Leaf positions are stored in 1/100 cm; DICOM wants mm.
_LEAF_UNIT_MM = 0.1
#: Batch size of ``IN (...)`` lists (SQL Server accepts at most 2100 parameters per statement).
_CHUNK = 500


def _chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start:start + _CHUNK]


def _text(value: object) -> str:
    """A char/varchar column without MOSAIQ's space padding."""
    return "" if value is None else str(value).strip()


def _number(value: object, table: str, key: str, column: str, *, integer: bool) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float) and not (integer and isinstance(value, float) and not value.is_integer()):
        return int(value) if integer else float(value)
    text = str(value).strip()
    try:
        return int(text) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise BadValue(Problem(table, key, "non-numeric-value", f"{column} {value!r} is not {kind}")) from None


def _int(value: object, table: str, key: str, column: str) -> int | None:
    number = _number(value, table, key, column, integer=True)
    return None if number is None else int(number)


def _float(value: object, table: str, key: str, column: str) -> float | None:
    number = _number(value, table, key, column, integer=False)
    return None if number is None else float(number)


def _enum(kind: type[Any], value: object, table: str, key: str, column: str, default: Any = None) -> Any:
    number = _int(value, table, key, column)
    if number is None:
        if default is not None:
            return default
        raise BadValue(Problem(table, key, "missing-enum", f"{column} is NULL"))
    try:
        return kind(number)
    except ValueError:
        raise BadValue(Problem(table, key, "unknown-enum", f"{column} {number} is not a known value")) from None


def leaf_positions_mm(blob: object, table: str, key: str, column: str,
                      leaves: int | None = None) -> tuple[float, ...] | None:
    """Decode a MOSAIQ leaf blob: little-endian int16 values in 1/100 cm, returned in mm.

    A leaf blob is a fixed-width record: only its first ``leaves`` values (``TxFieldPoint.MLC_Leaves``)
    are leaf positions, the rest is padding (pymedphys ``_mosaiq/delivery.py``, ``decode_msq_mlc``).
    With ``leaves`` given the result is cut to that count, and a blob too short for it is malformed;
    without it (no MLC_Leaves column or value) every value is returned.

    An odd byte count is padded with one zero byte (such blobs are seen when a reader strips trailing
    zero bytes; open readers pad them the same way). A value that is not binary, or an empty blob, is not
    a leaf set. The sign convention of the banks has not been checked against a real linac log: values
    are taken as IEC X coordinates.
    """
    if blob is None:
        return None
    if isinstance(blob, memoryview):
        blob = blob.tobytes()
    if not isinstance(blob, bytes | bytearray):
        raise BadValue(Problem(table, key, "malformed-leaf-blob", f"{column} is {type(blob).__name__}, not binary"))
    data = bytes(blob)
    if not data:
        return None
    if len(data) % 2:
        data += b"\x00"
    values = struct.unpack(f"<{len(data) // 2}h", data)
    if leaves is not None:
        if len(values) < leaves:
            raise BadValue(Problem(table, key, "malformed-leaf-blob",
                                   f"{column} holds {len(values)} leaf value(s), fewer than MLC_Leaves {leaves}"))
        values = values[:leaves]
    return tuple(round(v * _LEAF_UNIT_MM, 2) for v in values)


def _leaves(row: RowMapping, table: str, key: str, count: int | None) -> tuple[float, ...] | None:
    if count is not None and count < 0:
        raise BadValue(Problem(table, key, "malformed-leaf-blob", f"MLC_Leaves {count} is negative"))
    if count == 0:
        return None  # no MLC: whatever the blobs hold is padding
    a = leaf_positions_mm(row["A_Leaf_Set"], table, key, "A_Leaf_Set", count)
    b = leaf_positions_mm(row["B_Leaf_Set"], table, key, "B_Leaf_Set", count)
    if a is None and b is None:
        return None
    if a is None or b is None or len(a) != len(b):
        counts = f"{len(a) if a else 0} A leaves, {len(b) if b else 0} B leaves"
        raise BadValue(Problem(table, key, "malformed-leaf-blob", f"leaf banks differ in size ({counts})"))
    return a + b


def _point(row: RowMapping, table: str, key: str, energy: bool, count: int | None) -> ControlPoint:
    return ControlPoint(
        point=_int(row["Point"], table, key, "Point") or 0,
        index=_float(row["Index"], table, key, "Index"),
        gantry=_float(row["Gantry_Ang"], table, key, "Gantry_Ang"),
        collimator=_float(row["Coll_Ang"], table, key, "Coll_Ang"),
        energy=_float(row["Energy"], table, key, "Energy") if energy else None,
        leaves_mm=_leaves(row, table, key, count),
    )


def _points(rows: Iterable[RowMapping], table: str, id_column: str, energy: bool,
            leaf_counts: dict[int, int] | None = None) -> tuple[dict[int, list[ControlPoint]], dict[int, Problem]]:
    """Control points by owner id; an owner with a bad point gets a problem instead of points.

    The leaf count per bank is the row's own ``MLC_Leaves`` (TxFieldPoint), or ``leaf_counts[owner]`` when
    given (TxFieldPoint_Hst, whose blobs are read with the count of the delivered field's points).
    """
    points: dict[int, list[ControlPoint]] = {}
    problems: dict[int, Problem] = {}
    for row in rows:
        owner = int(row[id_column])
        key = f"{id_column}={owner} Point={row['Point']}"
        if owner in problems:
            continue
        try:
            count = (leaf_counts.get(owner) if leaf_counts is not None
                     else _int(row["MLC_Leaves"], table, key, "MLC_Leaves"))
            points.setdefault(owner, []).append(_point(row, table, key, energy, count))
        except BadValue as exc:
            problems[owner] = exc.problem
            points.pop(owner, None)
    for owner, cps in points.items():
        cps.sort(key=lambda cp: cp.point)
        counts = {len(cp.leaves_mm) for cp in cps if cp.leaves_mm is not None}
        if len(counts) > 1:
            problems[owner] = Problem(table, f"{id_column}={owner}", "malformed-leaf-blob",
                                      f"leaf counts differ between control points: {sorted(counts)}")
    return points, problems


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time())


class MosaiqReader:
    """Queries one MOSAIQ database. ``check()`` first: it says which optional tables are absent."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.present: set[str] = set()
        self.columns: dict[str, set[str]] = {}

    def check(self) -> list[str]:
        """Connect, require the tables of :data:`~.schema.REQUIRED`; return warnings for absent optional ones.

        Raises :class:`MissingTable` naming the first absent required table, and SQLAlchemy's
        ``OperationalError`` (or the driver's error) when the database cannot be reached.
        """
        inspector = inspect(self.engine)
        names = {name.lower(): name for name in inspector.get_table_names()}
        warnings: list[str] = []
        self.present = set()
        self.columns = {}
        for table in (*s.REQUIRED, *s.OPTIONAL):
            if table.lower() not in names:
                if table in s.REQUIRED:
                    raise MissingTable(f"required table {table} is absent from the MOSAIQ database")
                continue
            have = {c["name"].lower() for c in inspector.get_columns(names[table.lower()])}
            lacking = [c for c in s.KEY_COLUMNS[table] if c.lower() not in have]
            if lacking:
                if table in s.REQUIRED:
                    raise MissingTable(f"table {table} lacks the required column(s) {', '.join(lacking)}")
                warnings.append(f"table {table} lacks {', '.join(lacking)}: treated as absent")
                continue
            self.present.add(table)
            self.columns[table] = {c.name for c in s.metadata.tables[table].columns if c.name.lower() in have}
            absent = [c.name for c in s.metadata.tables[table].columns if c.name not in self.columns[table]]
            if absent:
                warnings.append(f"table {table} lacks {', '.join(absent)}: read as empty")
        effects = {
            "TxFieldPoint": "control points carry no gantry angle, energy or MLC positions",
            "FLD_HST": "the delivered meterset is Dose_Hst.Meterset, delivered control points are the planned ones",
            "TxFieldPoint_Hst": "delivered control points are the planned ones (TxFieldPoint)",
            "DCMStudy": "records go to a per-site study instead of the plan's study",
            "DCMSeries": "records go to a per-site study instead of the plan's study",
            "DCMInstance": "records go to a per-site study instead of the plan's study",
        }
        return warnings + [f"table {t} is absent: {effects[t]}" for t in s.OPTIONAL if t not in self.present]

    def _col(self, table: Table, name: str, label: str | None = None) -> ColumnElement[Any]:
        """A declared column, or NULL under its name when this database lacks it (see :meth:`check`)."""
        if name in self.columns.get(table.name, ()):
            column: ColumnElement[Any] = table.c[name]
            return column.label(label) if label else column
        return null().label(label or name)

    def _all(self, table: Table) -> list[ColumnElement[Any]]:
        return [self._col(table, c.name) for c in table.columns]

    def _rows_in(self, conn: Connection, table: Table, column: str, keys: Sequence[int]) -> list[RowMapping]:
        """Rows of ``table`` whose ``column`` is one of ``keys`` (none when the table is absent)."""
        if table.name not in self.present:
            return []
        rows: list[RowMapping] = []
        for chunk in _chunks(keys):
            rows += conn.execute(select(*self._all(table)).where(table.c[column].in_(chunk))).mappings()
        return rows

    # -- patients -----------------------------------------------------------------------------------

    def patients(self, date_from: date, date_to: date, patient_ids: Sequence[str] = ()) -> list[PatientInfo]:
        """Patients with a delivery between ``date_from`` and ``date_to`` (inclusive, local days).

        A day of margin on each side keeps sessions that cross midnight into or out of the window
        (:mod:`.mapping` decides which session dates are in the window).
        """
        dh, ident = s.Dose_Hst, s.Ident
        query = (
            select(ident.c.Pat_Id1, ident.c.IDA)
            # The current identity (Version 0); the Version filter is right here, unlike for TxField.
            .where(ident.c.Version == 0 if "Version" in self.columns["Ident"] else ident.c.Pat_Id1.is_not(None))
            .where(ident.c.Pat_Id1.in_(
                select(dh.c.Pat_ID1).where(dh.c.Tx_DtTm >= _day_start(date_from - timedelta(days=1)),
                                           dh.c.Tx_DtTm < _day_start(date_to + timedelta(days=2)))))
            .order_by(ident.c.Pat_Id1)
        )
        with self.engine.connect() as conn:
            rows = list(conn.execute(query).mappings())
            wanted = {p.strip() for p in patient_ids}
            unique = {int(r["Pat_Id1"]): r for r in rows}  # one identity per patient, even if Ident repeats
            chosen = [r for r in unique.values() if not wanted or _text(r["IDA"]) in wanted]
            ids = [int(r["Pat_Id1"]) for r in chosen]
            details: dict[int, RowMapping] = {}
            for chunk in _chunks(ids):
                for row in conn.execute(select(*self._all(s.Patient)).where(s.Patient.c.Pat_ID1.in_(chunk))).mappings():
                    details[int(row["Pat_ID1"])] = row
        out: list[PatientInfo] = []
        for row in chosen:
            pat = int(row["Pat_Id1"])
            detail = details.get(pat)
            name, birth = "", ""
            if detail is not None:
                parts = [_text(detail["Last_Name"]), _text(detail["First_Name"]), _text(detail["MIddle_Name"])]
                name = "^".join(parts).rstrip("^")
                born = detail["Birth_DtTm"]
                birth = born.strftime("%Y%m%d") if isinstance(born, datetime | date) else ""
            out.append(PatientInfo(pat, _text(row["IDA"]), name, birth))
        return out

    # -- deliveries ---------------------------------------------------------------------------------

    def deliveries(self, patient: PatientInfo) -> list[Delivery]:
        """Every ``Dose_Hst`` row of the patient, joined to the exact ``TxField`` version it delivered.

        Rule: the join is on ``Dose_Hst.FLD_ID = TxField.FLD_ID`` with no condition on
        ``TxField.Version``: a field edited after delivery keeps the delivered row as a history version
        (Version != 0), and that row (its meterset, its OriginalPlanUID) is what was delivered.
        The machine is ``Dose_Hst.Machine_ID_Staff_ID`` (the machine actually used), not the field's
        planned machine.
        """
        dh, tx, staff = s.Dose_Hst, s.TxField, s.Staff
        query = (
            select(*self._all(dh), self._col(tx, "FLD_ID", "tx_FLD_ID"), self._col(tx, "FLD_SET_ID"),
                   self._col(tx, "Version", "tx_Version"), self._col(tx, "SIT_Set_ID"), self._col(tx, "Field_Label"),
                   self._col(tx, "Field_Name"), self._col(tx, "Meterset", "tx_Meterset"),
                   self._col(tx, "Type_Enum", "tx_Type_Enum"), self._col(tx, "OriginalPlanUID"),
                   self._col(tx, "OriginalBeamName"), self._col(tx, "OriginalBeamNumber"),
                   self._col(staff, "Last_Name", "machine_name"))
            .select_from(dh.outerjoin(tx, tx.c.FLD_ID == dh.c.FLD_ID)
                         .outerjoin(staff, staff.c.Staff_ID == dh.c.Machine_ID_Staff_ID))
            .where(dh.c.Pat_ID1 == patient.pat_id1)
            .order_by(dh.c.Tx_DtTm, dh.c.DHS_ID)
        )
        with self.engine.connect() as conn:
            rows = list(conn.execute(query).mappings())
            dhs_ids = [int(r["DHS_ID"]) for r in rows]
            fld_ids = sorted({int(r["FLD_ID"]) for r in rows if r["FLD_ID"] is not None})
            fld_hst: dict[int, RowMapping] = {}
            for row in self._rows_in(conn, s.FLD_HST, "DHS_ID", dhs_ids):
                fld_hst.setdefault(int(row["DHS_ID"]), row)
            # Rule: TrackTreatment may hold several rows for one delivery; they are grouped per DHS_ID (one
            # delivery stays one beam item), and the delivery was in QA mode if any of them says so.
            tracks: dict[int, list[RowMapping]] = {}
            for row in self._rows_in(conn, s.TrackTreatment, "DHS_ID", dhs_ids):
                tracks.setdefault(int(row["DHS_ID"]), []).append(row)
            point_rows = self._rows_in(conn, s.TxFieldPoint, "FLD_ID", fld_ids)
            planned = _points(point_rows, "TxFieldPoint", "FLD_ID", energy=True)
            # TxFieldPoint_Hst is not known to have MLC_Leaves: its blobs are cut to the leaf count of the
            # delivered field's TxFieldPoint rows when those agree on one.
            field_counts: dict[int, set[int | None]] = {}
            for row in point_rows:
                count = row["MLC_Leaves"]
                field_counts.setdefault(int(row["FLD_ID"]), set()).add(
                    int(count) if isinstance(count, int | float) and not isinstance(count, bool) else None)
            fields_of = {int(r["DHS_ID"]): int(r["FLD_ID"]) for r in rows if r["FLD_ID"] is not None}
            hst_counts: dict[int, int] = {}
            for dhs, hst in fld_hst.items():
                known = field_counts.get(fields_of.get(dhs, -1), set())
                only = next(iter(known)) if len(known) == 1 else None
                if only is not None:
                    hst_counts[int(hst["FHS_ID"])] = only
            fhs_ids = sorted(int(r["FHS_ID"]) for r in fld_hst.values())
            delivered = _points(self._rows_in(conn, s.TxFieldPoint_Hst, "FHS_ID", fhs_ids), "TxFieldPoint_Hst",
                                "FHS_ID", energy=False, leaf_counts=hst_counts)
        return [self._delivery(row, fld_hst.get(int(row["DHS_ID"])), tracks.get(int(row["DHS_ID"]), []), planned,
                               delivered) for row in rows]

    def _delivery(self, row: RowMapping, hst: RowMapping | None, tracks: Sequence[RowMapping],
                  planned: tuple[dict[int, list[ControlPoint]], dict[int, Problem]],
                  delivered: tuple[dict[int, list[ControlPoint]], dict[int, Problem]]) -> Delivery:
        dhs_id = int(row["DHS_ID"])
        key = f"DHS_ID={dhs_id}"
        problems: list[Problem] = []

        def attempt(default: Any, make: Any) -> Any:
            try:
                return make()
            except BadValue as exc:
                problems.append(exc.problem)
                return default

        when = row["Tx_DtTm"]
        if not isinstance(when, datetime):
            problems.append(Problem("Dose_Hst", key, "bad-date", f"Tx_DtTm {when!r} is not a date and time"))
            when = datetime(1900, 1, 1)
        field: FieldVersion | None = None
        if row["tx_FLD_ID"] is not None:
            fkey = f"FLD_ID={row['tx_FLD_ID']}"
            # Each column on its own: a bad value marks the delivery (so its record is not written) but
            # the field still places the delivery in its session and plan.
            field = FieldVersion(
                fld_id=int(row["tx_FLD_ID"]),
                fld_set_id=attempt(0, lambda: _int(row["FLD_SET_ID"], "TxField", fkey, "FLD_SET_ID") or 0),
                version=attempt(0, lambda: _int(row["tx_Version"], "TxField", fkey, "Version") or 0),
                sit_set_id=attempt(0, lambda: _int(row["SIT_Set_ID"], "TxField", fkey, "SIT_Set_ID") or 0),
                label=_text(row["Field_Label"]),
                name=_text(row["Field_Name"]),
                meterset=attempt(None, lambda: _float(row["tx_Meterset"], "TxField", fkey, "Meterset")),
                field_type=attempt(FieldType.STATIC, lambda: _enum(FieldType, row["tx_Type_Enum"], "TxField", fkey,
                                                                   "Type_Enum")),
                plan_uid=_text(row["OriginalPlanUID"]),
                beam_name=_text(row["OriginalBeamName"]),
                beam_number=attempt(0, lambda: _int(row["OriginalBeamNumber"], "TxField", fkey,
                                                    "OriginalBeamNumber") or 0),
            )
        elif row["FLD_ID"] is not None:
            problems.append(Problem("Dose_Hst", key, "unknown-field", f"FLD_ID {row['FLD_ID']} has no TxField row"))
        else:
            problems.append(Problem("Dose_Hst", key, "unknown-field", "FLD_ID is NULL"))
        meterset = attempt(None, lambda: _float(row["Meterset"], "Dose_Hst", key, "Meterset"))
        points: list[ControlPoint] | None = None
        if hst is not None:
            meterset = attempt(meterset, lambda: _float(hst["Meterset"], "FLD_HST", f"FHS_ID={hst['FHS_ID']}",
                                                        "Meterset")) if hst["Meterset"] is not None else meterset
            fhs = int(hst["FHS_ID"])
            if fhs in delivered[1]:
                problems.append(delivered[1][fhs])
            points = delivered[0].get(fhs)
        if not points and field is not None:
            if field.fld_id in planned[1]:
                problems.append(planned[1][field.fld_id])
            points = planned[0].get(field.fld_id)
        machine = _text(row["machine_name"]) or None
        return Delivery(
            dhs_id=dhs_id,
            pat_id1=int(row["Pat_ID1"]),
            sit_id=attempt(None, lambda: _int(row["SIT_ID"], "Dose_Hst", key, "SIT_ID")),
            when=when,
            field=field,
            machine=machine,
            meterset=meterset,
            termination=attempt(TerminationStatus.UNKNOWN, lambda: _enum(
                TerminationStatus, row["Termination_Status_Enum"], "Dose_Hst", key, "Termination_Status_Enum",
                default=TerminationStatus.UNKNOWN)),
            verification=attempt(VerifyStatus.UNSPECIFIED, lambda: _enum(
                VerifyStatus, row["Termination_Verify_Status_Enum"], "Dose_Hst", key,
                "Termination_Verify_Status_Enum", default=VerifyStatus.UNSPECIFIED)),
            partially_treated=bool(attempt(0, lambda: _int(row["PartiallyTreated"], "Dose_Hst", key,
                                                           "PartiallyTreated") or 0)),
            qa_mode=any([bool(attempt(0, lambda t=t: _int(t["WasQAMode"], "TrackTreatment", f"DHS_ID={dhs_id}",
                                                           "WasQAMode") or 0)) for t in tracks]),
            fraction_in_effect=attempt(None, lambda: _int(row["Fx_Number_InEffect"], "Dose_Hst", key,
                                                          "Fx_Number_InEffect")),
            control_points=tuple(points or ()),
            problems=tuple(problems),
        )

    # -- sites and plans ----------------------------------------------------------------------------

    def sites(self, pat_id1: int) -> dict[int, SiteInfo]:
        """Every version of the patient's sites by SIT_ID (deliveries name the exact version)."""
        out: dict[int, SiteInfo] = {}
        with self.engine.connect() as conn:
            for row in conn.execute(select(*self._all(s.Site)).where(s.Site.c.Pat_ID1 == pat_id1)).mappings():
                key = f"SIT_ID={row['SIT_ID']}"
                try:
                    fractions = _int(row["Fractions"], "Site", key, "Fractions")
                except BadValue:
                    fractions = None  # Type 2 in the record: an unreadable value is left empty
                out[int(row["SIT_ID"])] = SiteInfo(int(row["SIT_ID"]), int(row["SIT_SET_ID"] or 0),
                                                   _text(row["Site_Name"]), fractions)
        return out

    def plan_locations(self, plan_uids: Iterable[str]) -> dict[str, PlanLocation]:
        """Study and series of the plans the DCM tables know (empty when those tables are absent).

        ``OriginalPlanUID`` is space padded and DCM columns may be too: both sides are compared stripped.
        """
        if not {"DCMStudy", "DCMSeries", "DCMInstance"} <= self.present:
            return {}
        wanted = sorted(set(plan_uids))
        inst, ser, stu = s.DCMInstance, s.DCMSeries, s.DCMStudy
        out: dict[str, PlanLocation] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks(wanted):
                padded = [*chunk, *(uid.ljust(64) for uid in chunk)]
                query = (
                    select(inst.c.SOPInstanceUID, self._col(inst, "SOPClassUID"), ser.c.SeriesInstanceUID,
                           stu.c.StudyInstanceUID)
                    .select_from(inst.join(ser, ser.c.DCMSeries_ID == inst.c.DCMSeries_ID)
                                 .join(stu, stu.c.DCMStudy_ID == ser.c.DCMStudy_ID))
                    .where(and_(inst.c.SOPInstanceUID.in_(padded)))
                )
                for row in conn.execute(query).mappings():
                    study, series = _text(row["StudyInstanceUID"]), _text(row["SeriesInstanceUID"])
                    if study and series:
                        out[_text(row["SOPInstanceUID"])] = PlanLocation(study, series, _text(row["SOPClassUID"]))
        return out
