"""What every benchmark in bench/ shares: the report's tail (printed, and appended to the markdown file
that ``--markdown`` names, such as bench/RESULTS.md)."""

from __future__ import annotations

from pathlib import Path


def publish(lines: list[str] | str, markdown: str | Path | None) -> str:
    """Print the report and append it to ``markdown`` when given; returns the report."""
    report = lines if isinstance(lines, str) else "\n".join(lines)
    print(report)
    if markdown:
        with open(markdown, "a", encoding="utf-8") as fh:
            fh.write(report + "\n")
    return report
