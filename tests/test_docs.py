"""The README and the docs site: the README's Python runs offline as written, its links and command list
match the docs, the benchmark tables are bench/results', and `mkdocs build --strict` passes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import update_docs

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# a prelude that makes any network connection fail, so the README's example must not need the hub
OFFLINE = """import socket
def _refuse(*a, **k):
    raise OSError("the network is off in this test")
socket.socket.connect = _refuse
socket.create_connection = _refuse
"""


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def command_block(path: Path) -> list[str]:
    text = path.read_text().split("## Command line", 1)[1]
    return [line for line in blocks(text, "")[0].splitlines() if line.startswith("irconvert ")]


def test_readme_is_short_and_its_first_block_is_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    first = blocks(text, "")[0].splitlines()
    assert len(first) == 2 and "irconvert resnet18 --recipe recipes/quickstart.yaml" in first[0]
    assert "python3 -m venv .venv" in first[1] and "pytest" in first[1]  # what .ci/run runs


@pytest.mark.slow
def test_readme_python_runs_as_written_offline(tmp_path):
    code = "\n".join(blocks(README.read_text(), "python"))
    assert "irconvert.pretrained()" in code
    env = dict(os.environ, PYTHONPATH=str(ROOT), IRCONVERT_RUNTIME="python",  # no kernel build in tests
               HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", OFFLINE + code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layer1.0.conv1" in proc.stdout  # the summary printed
    assert (tmp_path / "packed.safetensors").is_file() and (tmp_path / "model.safetensors").is_file()


def test_readme_command_list_is_the_getting_started_one():
    assert command_block(README) == command_block(ROOT / "docs" / "getting-started.md")


def _slug(heading: str) -> str:
    from markdown.extensions.toc import slugify

    return slugify(re.sub(r"`", "", heading), "-")


def test_readme_links_reach_files_and_headings():
    text = README.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert any(link.startswith("docs/benchmarks.md#") for link in links)
    for link in links:
        if "://" in link:
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else README
        assert target.exists(), f"README links to {link}, which does not exist"
        if anchor:
            heads = re.findall(r"^#+ (.+)$", target.read_text(), re.M)
            assert anchor in {_slug(h) for h in heads}, f"README links to {link}: no such heading"


def test_generated_tables_equal_bench_results():
    stale = [str(p.relative_to(ROOT)) for p, data in update_docs.outputs().items()
             if not p.is_file() or p.read_bytes() != data]
    assert not stale, f"stale, run python -m bench.update_docs: {stale}"


def test_benchmarks_page_fills_marked_tables_and_lists_the_rest(tmp_path):
    (tmp_path / "a.md").write_text("# A title\n\n| x |\n|---|\n| 1 |\n\n## Failures (0)\n\nNone.\n")
    (tmp_path / "new.md").write_text("| y |\n|---|\n| 2 |\n")
    page = ("# Benchmarks\n\n### A\n\n<!-- bench:a -->\nold\n<!-- /bench:a -->\n\n## Other results\n\n"
            "<!-- bench:others -->\n<!-- /bench:others -->\n")
    out = update_docs.benchmarks_page(page, tmp_path)
    assert "old" not in out and "| 1 |" in out and "A title" not in out
    assert "#### Failures (0)" in out  # nested under the section it sits in, not a stray top-level heading
    others = out.split("<!-- bench:others -->", 1)[1]
    assert "### `new`" in others and "| 2 |" in others and "`a`" not in others
    with pytest.raises(SystemExit, match="bench:gone"):
        update_docs.benchmarks_page(page + "<!-- bench:gone -->\n<!-- /bench:gone -->\n", tmp_path)


def test_readme_headline_reads_the_quickstart_result():
    import json

    qs = json.loads((ROOT / "bench" / "results" / "quickstart.json").read_text())
    row = next(line for line in update_docs.headline().splitlines() if "quickstart" in line)
    assert f"{qs['binary_top1']:.2f}%" in row and f"{qs['fp_top1']:.2f}%" in row
    assert f"{qs['wall_seconds'] / 60:.1f} min" in row


def test_site_builds_strict(tmp_path, monkeypatch):
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from mkdocs.exceptions import Abort

    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")
    config = load_config(config_file=str(ROOT / "mkdocs.yml"), site_dir=str(tmp_path / "site"), strict=True)
    try:
        build(config)  # strict: any warning (a broken link or anchor, a page not in the nav) aborts
    except Abort as exc:
        pytest.fail(f"mkdocs build --strict: {exc}")
    assert (tmp_path / "site" / "benchmarks" / "index.html").is_file()
    assert (tmp_path / "site" / "img" / "accuracy.png").is_file()


def test_site_build_fails_on_a_broken_link(tmp_path, monkeypatch):
    import shutil

    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from mkdocs.exceptions import Abort

    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with (tmp_path / "docs" / "index.md").open("a") as f:
        f.write("\n[a section that is not there](policy.md#no-such-heading)\n")
    config = load_config(config_file=str(tmp_path / "mkdocs.yml"), site_dir=str(tmp_path / "site"), strict=True)
    with pytest.raises(Abort):
        build(config)
