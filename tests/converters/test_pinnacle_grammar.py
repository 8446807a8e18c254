"""Pinnacle text grammar, free formats and their error positions."""

from __future__ import annotations

from pathlib import Path

import pytest

from rtharvest.converters.pinnacle.errors import PinnacleSyntaxError
from rtharvest.converters.pinnacle.freeformat import parse_free_text
from rtharvest.converters.pinnacle.grammar import Obj, XdrRef, decode, parse_file, parse_text

TRIAL = b"""// header comment
Trial ={
  Name = "Trial \\"A\\"";   /* binary bytes in a comment: \x00\xff\xfe\x80 */
  DoseGrid .VoxelSize .X = 0.4;
  DoseGrid .VoxelSize .Y = .5;
  DoseGrid .Dimension .X = 12;
  Empty = ;
  Bare = red;
  Tool = Pinnacle^3;
  Version = 9.0m;
  Words = Launch Pad 9.10;
  BeamList ={
    Beam ={ Name = "1"; DoseVolume = \\XDR:3\\; };
    Beam ={ Name = "2"; DoseVolume = \\XDR:7\\; };
  };
  CPManager ={
    ControlPointList ={
      #0 ={ Gantry = 180; Points[] ={ 1.5,-2e-1,
        3, }; };
      #1 ={ Gantry = -1.5E+1; Points[] ={ }; };
    };
  };
  SimpleString ={ String = "M\xfcller"; };
};
Trial ={ Name = "B"; };
"""


def test_every_form_of_the_grammar(tmp_path: Path) -> None:
    path = tmp_path / "plan.Trial"
    path.write_bytes(TRIAL)
    root = parse_file(path)
    trials = root.objs("Trial")
    assert [t.text("Name") for t in trials] == ['Trial "A"', "B"]
    first = trials[0]
    assert first.path("DoseGrid", "VoxelSize", "X") == 0.4
    assert first.path("DoseGrid", "VoxelSize", "Y") == 0.5
    assert first.path("DoseGrid", "Dimension", "X") == 12
    assert first.get("Empty") is None and "Empty" in [k for k, _ in first.entries]
    assert first.text("Bare") == "red" and first.text("Tool") == "Pinnacle^3"
    assert first.get("Version") == "9.0m" and first.get("Words") == "Launch Pad 9.10"
    beams = first.obj("BeamList")
    assert isinstance(beams, Obj)
    assert [b.get("DoseVolume") for b in beams.objs("Beam")] == [XdrRef(3), XdrRef(7)]
    cps = first.path("CPManager", "ControlPointList")
    assert isinstance(cps, Obj)
    items = cps.items()
    assert [i.num("Gantry") for i in items] == [180.0, -15.0]
    assert items[0].get("Points") == [1.5, -0.2, 3.0] and items[1].get("Points") == []
    assert first.path("SimpleString", "String") == "M\u00fcller"


@pytest.mark.parametrize(
    ("text", "line", "column", "message"),
    [
        ("A = 1;\nB = {\n", 3, 1, "not closed"),
        ("A = 1\nB = 2;", 2, 1, "expected ';'"),
        ("A = 1;\n  B = @;", 2, 7, "unexpected character"),
        ("A = 1; }", 1, 8, "without an open block"),
        ('A = "open', 1, 5, "unterminated string"),
        ("A = \\XDR:x\\;", 1, 5, "binary reference"),
        ("A[] ={ 1, x };", 1, 11, "expected a number"),
        ("/* never closed", 1, 1, "unterminated"),
    ],
)
def test_syntax_errors_name_file_line_and_column(text: str, line: int, column: int, message: str) -> None:
    with pytest.raises(PinnacleSyntaxError) as exc:
        parse_text(text, "Patient_1/plan.Trial")
    assert (exc.value.line, exc.value.column) == (line, column), str(exc.value)
    assert message in exc.value.message
    assert str(exc.value).startswith(f"Patient_1/plan.Trial:{line}:{column}: ")


def test_latin1_decoding_never_fails() -> None:
    assert decode(bytes(range(256)))[0xFC] == "\u00fc"


ROI = """// Region of Interest file
// Pinnacle Versions: 8.0m
 roi={
           name: BODY OUTLINE
           volume_name: ImageSet_0
           roiinterpretedtype:  ORGAN
           flags =          135168;
           num_curve = 2;
//  Curve 1 of 2
           curve={
                   num_points =  2;
                   points={
                      -12.9 2.1 -10.6
                      1 2 3
                   };
                 }; // End of points for curve 1
           curve={
                   num_points =  1;
                   points={
                   0 0 0
                   };
                 };
           surface_mesh={
                   allow_adaptation = 1;
                   vertices={
                     0.1 0.2 0.3
                   };
                   triangles={
                     0 1 2
                   };
                   normals={
                     1 0 0
                   };
           };
 }; // End of ROI
"""


def test_plan_roi_free_format() -> None:
    root = parse_free_text(ROI, "plan.roi")
    roi = root.objs("roi")[0]
    assert roi.text("name") == "BODY OUTLINE" and roi.num("num_curve") == 2
    assert roi.text("roiinterpretedtype") == "ORGAN"
    curves = roi.objs("curve")
    assert curves[0].get("points") == [-12.9, 2.1, -10.6, 1.0, 2.0, 3.0]
    assert curves[1].num("num_points") == 1
    mesh = roi.obj("surface_mesh")
    assert mesh is not None and mesh.get("triangles") == [0.0, 1.0, 2.0]


def test_header_mixes_equals_and_colon() -> None:
    root = parse_free_text(
        'byte_order = 0;\nx_dim = 512;\nread_conversion : "";\npatient_position : HFP\n'
        "db_name : PINNACLE3\nx_pixdim = 0.097656;\ncomment :\nSeries Description : head: neck\n",
        "ImageSet_0.header",
    )
    assert root.num("x_dim") == 512 and root.text("patient_position") == "HFP"
    assert root.num("x_pixdim") == pytest.approx(0.097656) and root.text("read_conversion") == ""
    assert root.text("comment") == "" and root.text("Series Description") == "head: neck"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("roi={\n name: X\n curve={\n points={\n 1 2 zz\n };\n };\n", 5, "expected a coordinate"),
        ("roi={\n name: X\n", 1, "not closed"),
        ("};\n", 1, "without an open block"),
        ("x_dim = 512;\n what is this\n", 2, "cannot read"),
        # A curve whose points are not all read (here: one on a line of its own block) is never dropped quietly.
        (
            "roi={\n num_curve = 1;\n curve={\n num_points = 2;\n points={ 1 2 3 };\n };\n};\n",
            3,
            "num_points = 2 but 1",
        ),
        ("roi={\n curve={\n  num_points = 1;\n };\n};\n", 2, "num_points = 1 but 0 points"),
        (
            "roi={\n num_curve = 2;\n curve={\n num_points = 1;\n points={\n 1 2 3\n };\n };\n};\n",
            1,
            "num_curve = 2 but 1",
        ),
        (" points={ 1 zz 3 };\n", 1, "expected a coordinate"),
    ],
)
def test_free_format_errors(text: str, line: int, message: str) -> None:
    with pytest.raises(PinnacleSyntaxError) as exc:
        parse_free_text(text, "plan.roi")
    assert exc.value.line == line and message in exc.value.message
    assert str(exc.value).startswith(f"plan.roi:{line}:")


def test_numeric_block_on_one_line() -> None:
    root = parse_free_text("roi={\n num_curve = 1;\n curve={\n num_points = 2;\n points={ 1 2 3, 4 5 6 };\n };\n};\n")
    (curve,) = root.objs("roi")[0].objs("curve")
    assert curve.get("points") == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    with pytest.raises(PinnacleSyntaxError) as exc:
        parse_free_text("  points={ 1 zz 3 };\n", "plan.roi")
    assert (exc.value.line, exc.value.column) == (1, 14)
