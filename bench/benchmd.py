"""BENCHMARKS.md: each benchmark owns one '## ' section and replaces only that one."""
from __future__ import annotations

import re
from pathlib import Path


def replace_section(path: Path, heading: str, section: str) -> None:
    """Replace the section that starts with the line `heading` (up to the next '## ' heading) by
    `section` (which starts with that heading), or append it; every other section is kept as is.
    Written atomically (temp file + rename)."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pat = re.compile(rf"^{re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    section = section.rstrip("\n") + "\n"
    if pat.search(text):
        text = pat.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text.rstrip("\n") + "\n")
    tmp.replace(path)
