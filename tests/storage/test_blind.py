"""Blind comparison files: ratings read back from the page's JSON and from a spreadsheet's CSV (byte-order
mark, blank lines, quoted notes), one-line errors for broken files, the tally written in each format."""

from __future__ import annotations

import csv
import json

import pytest

from core.blind import BlindError, TallyRow
from storage.blind import format_tally, ratings_template, read_ratings, write_tally

SET = "0123456789abcdef"


def test_csv_template_filled_in_by_a_spreadsheet_reads_back(tmp_path):
    lines = ratings_template(SET, ["F01", "F02", "F03"]).splitlines()
    assert lines == ["set,id,interpretability,context,note", *(f"{SET},F0{i},,," for i in (1, 2, 3))]
    path = tmp_path / "ratings.csv"
    with path.open("w", newline="", encoding="utf-8-sig") as fh:  # Excel writes a byte-order mark
        writer = csv.writer(fh)
        writer.writerow(["Set", "ID", "Interpretability", "Context", "Note"])
        writer.writerow([SET, "F01", "interpretable", "context-free", 'says "hi", twice'])
        writer.writerow(["", "", "", "", ""])
        writer.writerow([SET, "F02", "maybe", "", ""])
    found = read_ratings(path)
    assert found.set_id == SET
    assert [(where, row["id"], row["note"]) for where, row in found.rows] == [
        ("ratings.csv: line 2", "F01", 'says "hi", twice'),
        ("ratings.csv: line 4", "F02", ""),
    ]


def test_page_json_reads_back(tmp_path):
    path = tmp_path / "ratings.json"
    rows = [{"id": "F01", "interpretability": "maybe", "context": "", "note": ""}]
    path.write_text(json.dumps({"set": SET, "ratings": rows}))
    assert read_ratings(path) == (SET, [("ratings.json: ratings[0]", rows[0])])
    path.write_text(json.dumps(rows))  # a bare list names no set
    assert read_ratings(path).set_id is None


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("r.json", '{"ratings": [1]}', r"ratings\[0\] is 1, expected an object"),
        ("r.json", '{"set": 5, "ratings": []}', "set must be text"),
        ("r.json", '{"set": "x"}', "expected .*as the page downloads it"),
        ("r.csv", "set,id,interpretability\nx,F01,maybe,extra\n", "line 2 has more cells than the header"),
        ("r.csv", "set,id,interpretability\na,F01,maybe\nb,F02,maybe\n", "rows name several sets"),
    ],
)
def test_broken_files_are_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(BlindError, match=message) as err:
        read_ratings(path)
    assert "\n" not in str(err.value)


def test_tally_in_every_format(tmp_path):
    rows = [TallyRow("tc", 3, 2, 1, 0, 1, 1), TallyRow("sae", 3, 1, 1, 1, 1, 0)]
    assert format_tally(rows).splitlines()[1].split() == ["tc", "3", "2", "1", "0", "1", "1"]
    assert json.loads(write_tally(rows, tmp_path / "t.json").read_text())[1]["uninterpretable"] == 1
    assert write_tally(rows, tmp_path / "t.csv").read_text().splitlines()[2] == "sae,3,1,1,1,1,0"
    assert "| tc | 3 | 2 | 1 | 0 | 1 | 1 |" in write_tally(rows, tmp_path / "t.md").read_text()
    with pytest.raises(BlindError, match=r"\.csv, \.json or \.md"):
        write_tally(rows, tmp_path / "t.txt")
