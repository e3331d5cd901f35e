"""report.html: self-contained (images embedded), and it renders in a real browser with sortable tables."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ila.cli import main
from ila.html_report import write_html_report


@pytest.fixture(scope="module")
def identify_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_data: Path) -> Path:
    out = tmp_path_factory.mktemp("html") / "run"
    argv = ["-q", "identify", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--output", str(out)]
    overrides = ["stage1.max_steps=4", "stage1.window=2", "stage2.steps=2", "data.max_length=64", "run.threads=1"]
    assert main([*argv, *overrides]) == 0
    return out


def test_the_report_embeds_its_images_and_keeps_every_table(identify_run: Path) -> None:
    page = (identify_run / "report.html").read_text(encoding="utf-8")
    markdown = (identify_run / "report.md").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<script>" in page
    assert page.count("<table>") == sum(1 for line in markdown.splitlines() if line.startswith("|---"))
    assert 'src="data:image/png;base64,' in page  # the heatmap, inlined
    assert 'src="heatmap.png"' not in page


def test_a_missing_image_keeps_its_address(tmp_path: Path) -> None:
    (tmp_path / "report.md").write_text("# t\n\n![gone](gone.png)\n", encoding="utf-8")
    assert 'src="gone.png"' in write_html_report(tmp_path / "report.md").read_text(encoding="utf-8")


def _browser() -> str:
    for name in (os.environ.get("ILA_BROWSER"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    pytest.skip("no Chromium on this machine (apt-get install chromium, or set ILA_BROWSER)")


def test_the_report_renders_in_a_browser_and_its_tables_sort(identify_run: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (pip install)")
    executable = _browser()
    errors: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.goto((identify_run / "report.html").as_uri())
        assert page.title().startswith("ILA layer importance")
        sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
        assert sizes and all(done and width > 0 for done, width in sizes)  # every image decoded
        links = page.eval_on_selector_all("a[href]", "links => links.map(a => a.getAttribute('href'))")
        for href in links:  # relative links point at files of the run folder
            if ":" not in href and not href.startswith("#"):
                assert (identify_run / href).exists(), href
        table = page.locator("table", has=page.locator("th", has_text="score")).first
        header = table.locator("th", has_text="rank").first

        def first_column() -> list[int]:
            return [int(x) for x in table.locator("tbody tr td:first-child").all_inner_texts()]

        assert first_column() == sorted(first_column())
        header.click()  # ascending: already the order
        header.click()  # descending
        assert first_column() == sorted(first_column(), reverse=True)
        browser.close()
    assert not errors, errors


def test_ila_report_writes_its_html_too(identify_run: Path, tmp_path: Path) -> None:
    assert main(["-q", "report", str(identify_run), "--output", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert "<table>" in page and 'src="data:image/png;base64,' in page
