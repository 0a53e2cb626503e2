"""One report, two renderings: a list of blocks written as Markdown (figures as files beside it)
and as self-contained HTML (figures embedded as base64)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str  # may hold `code` spans and **bold**


@dataclass
class Code:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    name: str  # file name, e.g. throughput.png
    caption: str
    png: bytes


def to_markdown(blocks: list, folder: Path) -> str:
    out = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Text):
            out.append(block.text)
        elif isinstance(block, Code):
            out.append(f"```\n{block.text}\n```")
        elif isinstance(block, Table):
            out.append("\n".join(["| " + " | ".join(block.header) + " |",
                                  "|" + "---|" * len(block.header),
                                  *("| " + " | ".join(row) + " |" for row in block.rows)]))
        elif isinstance(block, Figure):
            (folder / block.name).write_bytes(block.png)
            out.append(f"![{block.caption}]({block.name})\n\n*{block.caption}*")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Markdown's `code` and **bold** in escaped HTML."""
    parts = html.escape(text).split("`")
    for i in range(1, len(parts), 2):
        parts[i] = f"<code>{parts[i]}</code>"
    bolds = "".join(parts).split("**")
    for i in range(1, len(bolds), 2):
        bolds[i] = f"<b>{bolds[i]}</b>"
    return "".join(bolds)


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px;
text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto}figure{margin:1em 0}img{max-width:100%}
figcaption{font-size:13px;color:#555}"""


def to_html(blocks: list, title: str) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_STYLE}</style></head><body>"]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            out.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Code):
            out.append(f"<pre>{html.escape(block.text)}</pre>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{_inline(cell)}</th>" for cell in block.header)
            body = "".join("<tr>" + "".join(f"<td>{_inline(cell)}</td>" for cell in row) + "</tr>"
                           for row in block.rows)
            out.append(f"<table><tr>{head}</tr>{body}</table>")
        elif isinstance(block, Figure):
            data = base64.b64encode(block.png).decode()
            out.append(f"<figure><img alt='{html.escape(block.caption)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{html.escape(block.caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)
