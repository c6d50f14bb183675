"""softmoe._tables: the one Markdown / CSV / plain-text table writer, byte for byte."""
import csv
import os

import pytest

from softmoe._tables import csv_text, markdown_table, text_table, write_csv, write_table


def test_markdown_table_formats_cells():
    rows = [{"a": 1, "b": 0.123456, "c": "x"}, {"a": 1234.5, "b": None}, [2, 99.94, True]]
    assert markdown_table(["a", "b", "c"], rows) == (
        "| a | b | c |\n"
        "|---|---|---|\n"
        "| 1 | 0.123 | x |\n"
        "| 1234 | - | - |\n"  # >= 100: to the unit; None and a missing key: "-"
        "| 2 | 99.9 | True |")


def test_markdown_table_without_rows_is_the_header():
    assert markdown_table(["a"], []) == "| a |\n|---|"


def test_a_row_of_the_wrong_length_is_a_value_error():
    with pytest.raises(ValueError, match=r"row must have one cell per column \(2: \['a', 'b'\]\), got 1: \[1\]"):
        markdown_table(["a", "b"], [[1]])
    with pytest.raises(ValueError, match="one cell per column"):
        csv_text(["a", "b"], [[1, 2, 3]])


def test_csv_text_keeps_raw_values_and_quotes():
    text = csv_text(["a", "b"], [{"a": 0.1 + 0.2, "b": None}, ["x,y", 'say "hi"'], {"b": 3, "extra": 9}])
    assert text == 'a,b\n0.30000000000000004,\n"x,y","say ""hi"""\n,3\n'
    assert list(csv.DictReader(text.splitlines())) == [
        {"a": "0.30000000000000004", "b": ""}, {"a": "x,y", "b": 'say "hi"'}, {"a": "", "b": "3"}]


def test_write_table_atomic_markdown_and_csv(tmp_path):
    rows = [{"a": 1, "b": 0.123456}, {"a": 2, "b": None}]
    md, cs = write_table(str(tmp_path / "out"), "t", ["a", "b"], rows, "Title", ["note one", "note two"])
    assert open(md).read() == ("# Title\n\n- note one\n- note two\n\n"
                               "| a | b |\n|---|---|\n| 1 | 0.123 |\n| 2 | - |\n")
    assert open(cs).read() == "a,b\n1,0.123456\n2,\n"
    assert sorted(os.listdir(tmp_path / "out")) == ["t.csv", "t.md"]  # no temp files left
    write_table(tmp_path, "u", ["a"], [], "No notes")
    assert (tmp_path / "u.md").read_text() == "# No notes\n\n| a |\n|---|\n"


def test_write_csv_is_atomic_and_creates_the_folder(tmp_path):
    path = write_csv(tmp_path / "d" / "x.csv", ["k"], [[1]])
    assert path.read_text() == "k\n1\n" and os.listdir(tmp_path / "d") == ["x.csv"]


def test_text_table_right_and_left_aligned():
    rows = [["1", "0.5000"], [22, "x"]]
    assert text_table(rows, header=["slot", "v"]) == "  slot       v\n     1  0.5000\n    22       x"
    assert text_table([("model", "vit"), ("data / step", "1 ms")], align="<") == \
        "  model        vit\n  data / step  1 ms"  # the last column is not padded
    assert text_table([], header=["a"]) == "  a" and text_table([]) == ""
    with pytest.raises(ValueError, match=r"align must be '<' or '>', got '\^'"):
        text_table(rows, align="^")


def test_the_call_sites_keep_their_text(capsys):
    from softmoe.cli.inspect import _print_table
    from softmoe.train.trainer import summary_table

    s = {"model": "vit", "params": 1e6, "data": "digits", "steps": 2, "resumed_from": None, "train_loss": 0.5,
         "test_accuracy": 0.25, "test_loss": 1.0, "images_per_s": 10.0, "data_ms_per_step": 1.0,
         "step_ms_per_step": 2.0, "data_time_fraction": 0.5, "wall_s": 3.0, "device": "cpu", "threads": 1,
         "checkpoint": "ck", "workdir": "w", "plots": []}
    assert summary_table(s).splitlines()[:3] == ["summary:", "  model             vit (1.00M params)",
                                                 "  data              digits"]
    rows = [{"slot": s, "w": s / 3} for s in range(17)]  # over 16 rows: the 8 highest and lowest only
    _print_table(rows, ["slot", "w"], sort_key="w")
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["  (17 rows; the 8 highest and lowest by w; all in the CSV)", "  slot       w",
                         "    16  5.3333"]
    assert len(lines) == 18 and lines[-1] == "     0  0.0000" and "     8  2.6667" not in lines
