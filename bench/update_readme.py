"""Copy each bench/results/<name>.md into README.md between <!-- bench:<name> --> and <!-- /bench:<name> -->.

    python bench/update_readme.py
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for md in sorted((ROOT / "bench" / "results").glob("*.md")):
        name = md.stem
        body = md.read_text().rstrip()
        if body.startswith("# "):  # the README's own heading names the table
            body = body.split("\n", 1)[1].lstrip()
        pattern = re.compile(rf"(<!-- bench:{re.escape(name)} -->\n).*?(<!-- /bench:{re.escape(name)} -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    readme.write_text(text)


if __name__ == "__main__":
    main()
