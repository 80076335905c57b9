"""memwarden._table: one table format, plain text when not on a terminal."""
import io

import pytest

from memwarden._table import format_table, render


def test_format_table_aligns_and_keeps_every_cell():
    long = "model.layers.0-47.mlp.experts.0-127 and then some more text"
    text = format_table("plan", ["device", "memory", "layers"], [[0, "16.00 GiB", long], ["cpu", "1 B", "-"]],
                        ["imbalance 0.1%"])
    assert text.splitlines() == [
        "plan",
        "  device     memory  " + " " * (len(long) - len("layers")) + "layers",
        f"  0       16.00 GiB  {long}",
        "  cpu           1 B  " + " " * (len(long) - 1) + "-",
        "  imbalance 0.1%",
    ]


def test_format_table_without_columns_has_no_blank_line():
    assert format_table("plan: DOES NOT FIT", [], [], ["short by 1 GiB"]) == "plan: DOES NOT FIT\n  short by 1 GiB"


def test_format_table_short_rows_and_no_title():
    assert format_table("", ["a", "b"], [["x"]]) == "  a  b\n  x"
    with pytest.raises(ValueError, match="3 cells but the header has 2"):
        format_table("t", ["a", "b"], [[1, 2, 3]])


def test_render_is_plain_when_not_a_terminal():
    out = io.StringIO()
    render("title", ["name", "size"], [["[bold]x[/bold]", 12]], ["note"], file=out)
    assert out.getvalue() == format_table("title", ["name", "size"], [["[bold]x[/bold]", 12]], ["note"]) + "\n"


def test_render_uses_rich_on_a_terminal():
    pytest.importorskip("rich")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    render("title", ["name", "size"], [["[bold]x[/bold]", 12]], ["foot [x]"], file=out)
    text = out.getvalue()
    assert "[bold]x[/bold]" in text and "foot [x]" in text  # cells are text, not markup
    assert "┃" in text or "|" in text
