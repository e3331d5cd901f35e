"""report.html beside report.md: one self-contained file a browser opens offline.

The Markdown report stays the source; this renders it with Python-Markdown (tables extension), embeds every local
image it references as a data URI (the heatmap, loss curves, overlap plots), makes each table sortable by a click on
its header, and keeps links to other files of the run folder relative, so the file can be mailed or attached
alone and still shows everything but those files.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import markdown

from ila import distributed
from ila.run_folder import atomic_write_text

_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 70rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: left; }
th { background: #f3f3f3; cursor: pointer; user-select: none; }
th[aria-sort="ascending"]::after { content: " \\25B2"; }
th[aria-sort="descending"]::after { content: " \\25BC"; }
img { max-width: 100%; }
code { background: #f5f5f5; padding: 0 0.2rem; }
blockquote { border-left: 4px solid #d33; margin: 1rem 0; padding: 0.2rem 1rem; background: #fff4f4; }
"""

# Click a header to sort its table by that column (numbers as numbers), click again to reverse.
_SCRIPT = """
document.querySelectorAll("table").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, column) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var up = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("th").forEach(function (other) { other.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", up ? "ascending" : "descending");
      function key(row) {
        var text = row.cells[column] ? row.cells[column].textContent.trim() : "";
        var number = parseFloat(text.replace(/[%,±]/g, ""));
        return isNaN(number) ? text.toLowerCase() : number;
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (typeof x !== typeof y) { x = String(x); y = String(y); }
        return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1);
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""

_IMAGE = re.compile(r'(<img[^>]*\bsrc=")([^"]+)(")')
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}


def write_html_report(markdown_path: Path, extra_images: tuple[str, ...] = ()) -> Path:
    """Render `markdown_path` (a report.md) to report.html in the same folder and return its path.

    `extra_images` are files of the folder that the Markdown does not show but a reader wants to see (the heatmap
    of an identify run); they are appended under "Figures"."""
    folder = markdown_path.parent
    target = folder / "report.html"
    if not distributed.is_main():  # only the main process wrote report.md
        return target
    text = markdown_path.read_text(encoding="utf-8")
    shown = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text))
    figures = [name for name in extra_images if name not in shown and (folder / name).is_file()]
    if figures:
        text += "\n\n## Figures\n\n" + "\n\n".join(f"![{name}]({name})" for name in figures) + "\n"
    body = markdown.markdown(text, extensions=["tables", "fenced_code", "sane_lists"])
    body = _IMAGE.sub(lambda m: m.group(1) + _inline(folder, m.group(2)) + m.group(3), body)
    title = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), "ila report")
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n"
        f"<script>{_SCRIPT}</script>\n</body>\n</html>\n"
    )
    atomic_write_text(target, page)
    return target


def _inline(folder: Path, src: str) -> str:
    """A local image as a data URI; remote or missing images keep their address."""
    if re.match(r"[a-z]+:", src):
        return src
    path = (folder / html.unescape(src)).resolve()
    mime = _MIME.get(path.suffix.lower())
    if mime is None or not path.is_file():
        return src
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")
