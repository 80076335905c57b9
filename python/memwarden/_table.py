"""Tables: the one way memwarden prints rows of figures.

:func:`format_table` returns plain text: the title on its own line, then the header and
the rows indented by two spaces, columns separated by two spaces, the first column
left-aligned and the others right-aligned, every cell in full (nothing is ever cut), then
the footer lines, indented the same way. ``.report()`` methods return it.

:func:`html_table` is the same table as HTML, for notebooks' ``_repr_html_``.

:func:`render` prints a table: with ``rich`` when rich is installed *and* the target is a
terminal (cells that do not fit fold onto the next line rather than being cut), otherwise
the text of :func:`format_table` -- so output that is piped, redirected or captured stays
plain and complete.

May import: the standard library only (rich lazily, inside :func:`render`).
"""
from __future__ import annotations

import sys
from typing import Any, Iterable, Sequence, TextIO

__all__ = ["format_table", "html_table", "render"]


def _cells(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> tuple[list[str], list[list[str]]]:
    head = [str(h) for h in header]
    body = []
    for row in rows:
        cells = [str(c) for c in row]
        if len(cells) > len(head):
            raise ValueError(f"table row has {len(cells)} cells but the header has {len(head)}: {cells!r}")
        body.append(cells + [""] * (len(head) - len(cells)))
    return head, body


def format_table(title: str | None, header: Sequence[Any], rows: Iterable[Sequence[Any]],
                 footer: Iterable[Any] = ()) -> str:
    """Plain aligned text of a table (see the module docstring); ``title`` may be empty."""
    head, body = _cells(header, rows)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = [title] if title else []
    for row in [head, *body] if head else []:  # no header: title and footer only
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append(("  " + "  ".join(cells)).rstrip())
    lines += [f"  {line}" for line in footer]
    return "\n".join(lines)


def html_table(title: str | None, header: Sequence[Any], rows: Iterable[Sequence[Any]],
               footer: Iterable[Any] = ()) -> str:
    """The table of :func:`format_table` as HTML (every cell escaped; the first column
    left-aligned, the others right-aligned; footer lines keep their spaces), for Jupyter's
    ``_repr_html_``."""
    from html import escape

    head, body = _cells(header, rows)

    def row(cells, tag):
        return "<tr>" + "".join(f'<{tag} style="text-align:{"left" if i == 0 else "right"}">{escape(c)}</{tag}>'
                                for i, c in enumerate(cells)) + "</tr>"

    parts = [f"<b>{escape(title)}</b>"] if title else []
    if head:
        parts.append("<table>" + row(head, "th") + "".join(row(r, "td") for r in body) + "</table>")
    # footers separate their fields with runs of spaces (as the text table does): keep them
    parts += [f'<div style="white-space:pre-wrap">{escape(str(line))}</div>' for line in footer]
    return "<div>" + "".join(parts) + "</div>"


def _is_terminal(file: Any) -> bool:
    isatty = getattr(file, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (ValueError, OSError):  # closed or detached stream
        return False


def render(title: str | None, header: Sequence[Any], rows: Iterable[Sequence[Any]],
           footer: Iterable[Any] = (), *, file: TextIO | None = None) -> None:
    """Print a table to ``file`` (default ``sys.stdout``): rich on a terminal when rich is
    installed, else the plain text of :func:`format_table`."""
    out = sys.stdout if file is None else file
    rows, footer = list(rows), list(footer)
    if _is_terminal(out):
        try:
            from rich.console import Console
            from rich.table import Table
            from rich.text import Text
        except ImportError:
            pass
        else:
            head, body = _cells(header, rows)
            table = Table(title=Text(title) if title else None, title_justify="left")
            for i, h in enumerate(head):
                table.add_column(Text(h), justify="left" if i == 0 else "right", overflow="fold")
            for row in body:
                table.add_row(*(Text(c) for c in row))  # cells are text, not rich markup
            console = Console(file=out)
            if head:
                console.print(table)
            elif title:  # no columns (an infeasible plan): the title alone
                console.print(Text(title))
            for line in footer:
                console.print(str(line), highlight=False, markup=False)
            return
    print(format_table(title, header, rows, footer), file=out)
