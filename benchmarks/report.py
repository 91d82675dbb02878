"""A tiny report model rendered to Markdown and to a static HTML page (no extra dependency).

A report is a list of blocks: headings, paragraphs, tables and images, with
image paths relative to the report folder.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lidc_det.atomic import write_text


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[object]]


@dataclass(frozen=True)
class Image:
    path: str  # relative to the report folder
    caption: str


Block = Heading | Paragraph | Table | Image


@dataclass
class Report:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for b in self.blocks:
            if isinstance(b, Heading):
                out += ["#" * b.level + " " + b.text, ""]
            elif isinstance(b, Paragraph):
                out += [b.text, ""]
            elif isinstance(b, Table):
                out.append("| " + " | ".join(str(h) for h in b.header) + " |")
                out.append("|" + "---|" * len(b.header))
                out += ["| " + " | ".join(str(c) for c in row) + " |" for row in b.rows]
                out.append("")
            else:
                out += [f"![{b.caption}]({b.path})", f"*{b.caption}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        e = html.escape
        body = [f"<h1>{e(self.title)}</h1>"]
        for b in self.blocks:
            if isinstance(b, Heading):
                body.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
            elif isinstance(b, Paragraph):
                body.append(f"<p>{e(b.text)}</p>")
            elif isinstance(b, Table):
                head = "".join(f"<th>{e(str(h))}</th>" for h in b.header)
                rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in b.rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            else:
                body.append(f'<figure><img src="{e(b.path)}" alt="{e(b.caption)}"><figcaption>{e(b.caption)}</figcaption></figure>')
        style = (
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
            "th{background:#f2f2f2}img{max-width:100%}figcaption{font-style:italic;color:#444}"
        )
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{e(self.title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
        )

    def write(self, folder: Path) -> tuple[Path, Path]:
        """Write ``report.md`` and ``report.html`` into ``folder`` (atomically)."""
        folder = Path(folder)
        md, page = folder / "report.md", folder / "report.html"
        write_text(md, self.markdown())
        write_text(page, self.html())
        return md, page
