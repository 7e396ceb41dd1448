"""The study's ``report.md``."""

from __future__ import annotations

from .context import PUBLISHED_STEPS
from .section import Section

__all__ = ["markdown", "markdown_table"]


def markdown_table(headers: list[str], rows: list[list[str]], align: str) -> str:
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in headers) + " |"]
    lines.append("|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|")
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(doc: dict, sections: list[Section]) -> str:
    c, d = doc["config"], doc["dataset"]
    out = ["# What parameter sharing buys: the paramshare study", ""]
    out.append(
        "Each section tests one claim the field makes about parameter sharing, on real data, with the "
        "models' stored parameters counted by `paramshare.report`."
    )
    out.append("")
    out.append(f"- **Data**: {d['description']}.")
    if c["steps_override"] is not None:
        out.append(f"- **Budget**: smoke run, baselines trained for {c['steps_override']} steps (published: {PUBLISHED_STEPS}); "
                   "every other budget scaled alike. The numbers are not meaningful.")
    elif c["quick"]:
        out.append(f"- **Budget**: `--quick`: fewer training steps than the published {PUBLISHED_STEPS} (see each table's "
                   "steps) and fewer seeds, so accuracies are below the published ones. Run without `--quick` for the full study.")
    else:
        out.append(f"- **Budget**: full: the published recipe (Adam, learning rate 1e-2, batch 100, {PUBLISHED_STEPS} steps) "
                   "for the baselines; the sweeps use the steps their tables show.")
    out.append(f"- **Seed**: {c['seed']} (the same seed gives the same numbers). Training: Adam, lr 1e-2, batch 100.")
    out.append(f"- **Reproduce**: `paramshare study{' --quick' if c['quick'] else ''} --seed {c['seed']} --data {c['data']}`"
               + (f" `--steps {c['steps_override']}`" if c["steps_override"] is not None else ""))
    out.append("")
    for i, s in enumerate(sections, 1):
        out.append(f"## {i}. {s.title}")
        out.append("")
        if s.question:
            out.append(f"*{s.question}*")
            out.append("")
        if s.skipped:
            out += [f"Skipped: {s.skipped}", ""]
            continue
        headers, cells, align = s.table_cells()
        out += [markdown_table(headers, cells, align), ""]
        for f in s.findings:
            out.append(f"- {f}")
        if s.findings:
            out.append("")
        for fig in s.figures:
            out += [f"![{fig.title}]({fig.file})", ""]
        for n in s.notes:
            out.append(f"> {n}")
        if s.notes:
            out.append("")
    out.append("---")
    out.append(f"paramshare {doc['paramshare']}, torch {doc['torch']}, Python {doc['python']}; "
               f"{c['workers']} worker process(es); wall time {doc['wall_seconds']:.0f} s.")
    out.append("")
    return "\n".join(out)
