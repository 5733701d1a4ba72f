"""One self-contained HTML report: the tables and the figures of a study in a single file.

Everything is inline (CSS in a <style> element, figures as base64 PNG data URIs, no scripts), so the
file opens offline, survives being mailed or attached to a review, and never fetches anything.
"""

from __future__ import annotations

import base64
import html
from pathlib import PurePath

from lora_ablate.export.plots import Plot
from lora_ablate.export.tables import Table, to_html, trained_again
from lora_ablate.export.tracked import Study
from lora_ablate.vocab import state_word

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 70rem;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { margin-bottom: .2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2.5rem; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .85rem; }
th, td { border: 1px solid #ccc; padding: .25rem .5rem; text-align: left; }
th { background: #f3f3f3; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.caption, .note, figcaption { color: #555; font-size: .85rem; max-width: 60rem; }
figure { margin: 1.5rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: .1rem 1rem; font-size: .9rem; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; }
"""

META_TAGS = ("model", "data", "device", "git_sha")


def space_text(tags: dict) -> str:
    """The space as its study recorded it: the file it was read from (a space given as a file is named
    after the file's stem, "space" for space.yaml) or its name, then its description."""
    file, name = tags.get("lora_ablate.space_file"), tags.get("lora_ablate.space", "")
    desc = tags.get("lora_ablate.space_description")
    return (PurePath(file).name if file else name) + (f": {desc}" if desc else "")


def report_meta(study: Study) -> list[tuple[str, str]]:
    """The report's header lines, (what, value): the store, objective, axes, trial counts, the space, the
    model, data, device and commit."""
    counts = study.counts()
    meta = [("tracking", study.display_uri), ("objective", f"{study.objective} ({study.direction()})"),
            ("axes", ", ".join(a.label for a in study.axes) or "(single configuration)"),
            ("trials", ", ".join(f"{n} {state_word(s)}" for s, n in sorted(counts.items()))
             + (f" ({again} of them trained again and completed later)" if (again := trained_again(study)) else ""))]
    if space_text(study.tags):
        meta.append(("space", space_text(study.tags)))
    return meta + [(k, study.tags[f"lora_ablate.{k}"]) for k in META_TAGS if study.tags.get(f"lora_ablate.{k}")]


def _figure(p: Plot) -> str:
    data = base64.b64encode(p.png.read_bytes()).decode("ascii")
    return (f'<figure id="{html.escape(p.name)}"><img alt="{html.escape(p.title)}" '
            f'src="data:image/png;base64,{data}">\n<figcaption><strong>{html.escape(p.title)}.</strong> '
            f"{html.escape(p.caption)} (Also {html.escape(p.png.name)} and {html.escape(p.svg.name)}.)"
            f"</figcaption></figure>")


def render_report(study: Study, tables: list[Table], plots: list[Plot], notes: list[str]) -> str:
    dl = "\n".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in report_meta(study))
    toc = "\n".join(f'<li><a href="#{html.escape(x.name)}">{html.escape(x.title)}</a></li>'
                    for x in [*tables, *plots])
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{html.escape(study.name)}: LoRA ablation results</title>", f"<style>{CSS}</style>", "</head>",
        "<body>", f"<h1>{html.escape(study.name)}</h1>", f'<dl class="meta">{dl}</dl>',
        f"<h2>Contents</h2><ul>{toc}</ul>",
        "<h2>Tables</h2>", *(to_html(t) for t in tables),
        "<h2>Figures</h2>", *(_figure(p) for p in plots),
        *([f"<h2>Notes</h2><ul>{note_html}</ul>"] if notes else []),
        "</body>", "</html>", ""])
