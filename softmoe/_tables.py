"""The one table writer: Markdown and CSV tables from columns + rows, the atomic file variants
(through softmoe._io), and aligned plain-text tables for the terminal.

A row is either a mapping (read by column name; a missing key is an empty cell) or a sequence
of cells in column order. None is "-" in Markdown and an empty field in CSV.
"""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from softmoe._io import atomic_write_text

Row = Mapping | Sequence


def _cells(columns: Sequence[str], row: Row) -> list:
    if isinstance(row, Mapping):
        return [row.get(c) for c in columns]
    if len(row) != len(columns):
        raise ValueError(f"row must have one cell per column ({len(columns)}: {list(columns)}), "
                         f"got {len(row)}: {list(row)}")
    return list(row)


def markdown_cell(value) -> str:
    """None -> "-"; a float to 3 significant digits below 100, else to the unit; else str()."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[Row]) -> str:
    """A GitHub Markdown table (header, `|---|` rule, one line per row), without a final newline."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(markdown_cell(v) for v in _cells(columns, row)) + " |" for row in rows]
    return "\n".join(lines)


def csv_text(columns: Sequence[str], rows: Sequence[Row]) -> str:
    """CSV with a header line, "\\n" line ends; None is an empty field, other values as csv
    writes them. No columns: the empty text."""
    if not columns:
        return ""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(["" if v is None else v for v in _cells(columns, row)] for row in rows)
    return buf.getvalue()


def write_csv(path: str | os.PathLike, columns: Sequence[str], rows: Sequence[Row]) -> Path:
    """`csv_text(columns, rows)` written atomically to `path` (its folder is created)."""
    return atomic_write_text(path, csv_text(columns, rows))


def write_table(out_dir: str | os.PathLike, stem: str, columns: Sequence[str], rows: Sequence[Row], title: str,
                notes: Sequence[str] = ()) -> tuple[str, str]:
    """Write `<out_dir>/<stem>.md` ("# title", the notes as a bullet list, the Markdown table)
    and `<out_dir>/<stem>.csv` (the raw values), each atomically. Returns both paths."""
    md = f"# {title}\n\n" + "".join(f"- {n}\n" for n in notes) + ("\n" if notes else "")
    md_path, csv_path = os.path.join(out_dir, stem + ".md"), os.path.join(out_dir, stem + ".csv")
    atomic_write_text(md_path, md + markdown_table(columns, rows) + "\n")
    write_csv(csv_path, columns, rows)
    return md_path, csv_path


def text_table(rows: Sequence[Sequence], header: Sequence[str] | None = None, align: str = ">",
               indent: str = "  ") -> str:
    """Plain-text columns for the terminal: each cell str()-ed and padded to its column's widest
    cell (header included), right-aligned (`align=">"`) or left-aligned ("<"), columns two
    spaces apart, every line starting with `indent`, no trailing spaces, no final newline."""
    if align not in ("<", ">"):
        raise ValueError(f"align must be '<' or '>', got {align!r}")
    lines = ([list(header)] if header is not None else []) + [[str(c) for c in r] for r in rows]
    if not lines:
        return ""
    widths = [max(len(line[i]) for line in lines if i < len(line)) for i in range(max(map(len, lines)))]
    pad = str.rjust if align == ">" else str.ljust
    return "\n".join((indent + "  ".join(pad(c, w) for c, w in zip(line, widths))).rstrip() for line in lines)
