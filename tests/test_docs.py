"""The README stays a page (reference material lives in docs/), and every relative link in the
README, docs/ and the passes' README leads to a file that exists."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "autosp" / "passes" / "README.md"]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def test_the_readme_fits_on_a_page_or_two():
    assert len((ROOT / "README.md").read_bytes()) < 8 * 1024


def test_every_relative_link_leads_somewhere():
    broken = [f"{page.relative_to(ROOT)}: {target}" for page in PAGES for target, _ in LINK.findall(page.read_text())
              if "://" not in target and not (page.parent / target).exists()]
    assert not broken, broken
    assert sum(len(LINK.findall(p.read_text())) for p in PAGES) >= 10  # the check looked at links at all


def test_the_link_check_catches_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("see [there](nowhere.md) and [here](page.md)")
    found = [t for t, _ in LINK.findall(page.read_text()) if not (page.parent / t).exists()]
    assert found == ["nowhere.md"]
