"""A self-contained HTML page: inline CSS, images as base64 data URIs, no script, nothing fetched.

Example:
    >>> body = section("summary", "Summary", table(["run", "top-1"], [["base", "96.39"]]))
    >>> Path("report.html").write_text(page("prunekit report", [body]))
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from html import escape
from pathlib import Path

_MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1200px; padding: 0 16px; color: #1f2328; background: #ffffff; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #d0d7de; padding-bottom: 6px; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 10px 0; font-size: 0.86em; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: #f6f8fa; }
td.text, th.text { text-align: left; }
tr.miss td { background: #fff1f0; }
tr.met td { background: #effaf1; }
tr.base td { background: #f6f8fa; }
img { max-width: 100%; height: auto; border: 1px solid #eaeef2; margin: 6px 0; }
p.note { color: #57606a; font-style: italic; }
code { background: #f6f8fa; padding: 1px 4px; border-radius: 3px; }
nav a { margin-right: 12px; }
"""


def data_uri(path: str | Path) -> str:
    """The file as a ``data:`` URI (PNG, SVG or JPEG)."""
    p = Path(path)
    mime = _MIME.get(p.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(p.read_bytes()).decode('ascii')}"


def img(path: str | Path, alt: str) -> str:
    return f'<img src="{data_uri(path)}" alt="{escape(alt)}">'


def inline(text: str) -> str:
    """Escape ``text``; Markdown-style `code` spans become ``<code>``."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text))


def note(text: str) -> str:
    return f'<p class="note">{inline(text)}</p>'


def para(text: str) -> str:
    return f"<p>{inline(text)}</p>"


def bullets(items: Sequence[str]) -> str:
    return "<ul>" + "".join(f"<li>{inline(i)}</li>" for i in items) + "</ul>"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], text_cols: int = 1,
          row_classes: Sequence[str] | None = None) -> str:
    """A table; the first ``text_cols`` columns are left-aligned text, the rest right-aligned numbers."""
    def cls(j: int) -> str:
        return ' class="text"' if j < text_cols else ""

    head = "".join(f"<th{cls(j)}>{escape(h)}</th>" for j, h in enumerate(headers))
    body = []
    for i, row in enumerate(rows):
        rc = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{rc}>" + "".join(f"<td{cls(j)}>{escape(str(c))}</td>" for j, c in enumerate(row)) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{escape(sid)}">\n<h2>{escape(title)}</h2>\n{body}\n</section>'


def page(title: str, sections: Sequence[str], subtitle: str = "", nav: Sequence[tuple[str, str]] = ()) -> str:
    links = "".join(f'<a href="#{escape(i)}">{escape(t)}</a>' for i, t in nav)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n<h1>{escape(title)}</h1>\n"
            + (f"<p>{escape(subtitle)}</p>\n" if subtitle else "")
            + (f"<nav>{links}</nav>\n" if links else "")
            + "\n".join(sections) + "\n</body>\n</html>\n")
