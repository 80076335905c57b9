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


def test_html_table_escapes_and_aligns():
    from memwarden._table import html_table

    html = html_table("a <b> & c", ["part", "bytes"], [["<script>", "1 KiB"]], ["fits & more"])
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "a &lt;b&gt; &amp; c" in html and "fits &amp; more" in html
    assert '<td style="text-align:left">&lt;script&gt;</td><td style="text-align:right">1 KiB</td>' in html
    assert html_table("only a title", [], []) == "<div><b>only a title</b></div>"


def test_html_table_footer_keeps_the_spaces_between_its_fields():
    # "retries: 4   OOMs: 1" must not collapse to "retries: 4 OOMs: 1" in a browser
    from memwarden._table import html_table

    html = html_table("t", ["a"], [["1"]], ["retries: 4   OOMs: 1"])
    assert '<div style="white-space:pre-wrap">retries: 4   OOMs: 1</div>' in html


def test_notebook_displays_of_estimate_plan_and_kv_stats():
    import torch

    from memwarden import estimate, plan
    from memwarden.kv import PagedKVCache

    e = estimate.estimate("llama-3.1-8b", context=8192)
    assert repr(e).startswith("<Estimate llama-3.1-8b") and "total " in repr(e) and len(repr(e)) < 300
    assert "<table>" in e._repr_html_() and "KV cache" in e._repr_html_()
    p = plan.plan("mixtral-8x7b", max_memory={0: "48GiB", 1: "48GiB"}, reserve="2GiB")
    html = p._repr_html_()
    assert html.count("<tr>") == 1 + 2 and "imbalance" in html  # header + two devices, the footer
    store = PagedKVCache(2, 2, 16, page_size=4, dtype=torch.float32, max_memory="64KiB")
    store.add(0, torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16))
    store.add(1, torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16))
    html = store.stats()._repr_html_()
    assert "KV cache: 9 tokens" in html and "<td style=\"text-align:right\">3</td>" in html  # 3 pages resident


def test_plots_return_figures_with_the_numbers_drawn():
    pytest.importorskip("matplotlib")
    from memwarden import estimate, plan

    p = plan.plan("mixtral-8x7b", max_memory={0: "48GiB", 1: "48GiB"}, reserve="2GiB")
    fig = p.plot()
    ax = fig.axes[0]
    labels = [c.get_label() for c in ax.containers]
    assert labels[-2:] == ["reserve (KV, activations)", "free"] and "routed experts" in labels
    weights = [sum(c[i].get_height() for c in ax.containers[:-2]) for i in range(len(p.devices))]
    assert weights == pytest.approx([p.load[d] / 2**30 for d in p.devices])  # the kinds add up to the load
    experts = ax.containers[labels.index("routed experts")]
    assert [bar.get_height() for bar in experts] == pytest.approx(
        [sum(part.bytes for part, d in zip(p.parts, p.assignment) if part.kind == "expert" and d == dev) / 2**30
         for dev in p.devices])
    assert "imbalance" in ax.get_title()
    e = estimate.estimate("llama-3.1-8b", context=8192)
    fig = e.plot()
    bar, line = fig.axes
    assert sum(c[0].get_height() for c in bar.containers) == pytest.approx(e.total / 2**30)
    assert line.get_xscale() == "log"
    fig.savefig(io.BytesIO(), format="png")  # renders
