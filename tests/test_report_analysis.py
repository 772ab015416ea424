"""The report's analysis views, rendered from real records (three committed quickstart models and
their per-sample outputs) and a real analysis.json: delta table, ER column and scatter, mCE,
reliability diagrams, per-corruption small multiples, escaping of hostile names, staleness, and
the leaderboard on a 390-px phone screen in headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import pytest
from test_report import CHROMIUM, CHROMIUM_ARGS, body_rows, cell, header_keys, parse

from robench.analysis import AnalysisSettings, analyze
from robench.report import render_report
from robench.results import write_record_json

QUICKSTART = Path(__file__).resolve().parents[1] / "results" / "quickstart"
MODELS = ("tiny-clip-cifar10", "tiny-clip-lp-clip", "tiny-clip-wise-ft-a0.5")
ID, OOD = "cifar10-subset-test", "cifar10-subset-test-c"
EVIL = "<i>lp</i>&co"  # a model renamed into markup: must stay text everywhere


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("results")
    for m in MODELS:
        shutil.copytree(QUICKSTART / m, root / "quickstart" / m)
    # the LP-CLIP records renamed into hostile text (the folder keeps a safe name)
    for d in (ID, OOD):
        path = root / "quickstart" / "tiny-clip-lp-clip" / f"{d}.json"
        rec = json.loads(path.read_text())
        rec["model"] = EVIL
        write_record_json(path, {k: v for k, v in rec.items() if k != "integrity"})
    [(_, doc)] = analyze(root, AnalysisSettings(er_reference="all",
                                                mce_baseline="tiny-clip-cifar10", bootstrap=30))
    out = tmp_path_factory.mktemp("site")
    index = render_report(root, out)
    html = index.read_text(encoding="utf-8")
    return {"root": root, "out": out, "index": index, "html": html, "dom": parse(html),
            "doc": doc}


def test_delta_table_shows_paired_deltas_with_intervals(site: dict) -> None:
    table = site["dom"].by_id("suite-quickstart-deltas")
    rows = {r[0].text(): r for r in body_rows(table)}
    assert set(rows) == {EVIL, "tiny-clip-wise-ft-a0.5"}  # the reference has no row
    assert cell(table, EVIL, "reference").text() == "tiny-clip-cifar10"
    comp = next(c for c in site["doc"]["comparisons"]
                if c["model"] == EVIL and c["dataset"] == OOD)
    d = comp["delta"]["acc1"]
    td = cell(table, EVIL, f"{OOD}/d_acc1")
    assert td.text() == f"{d['value']:+.1f} [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]"
    assert ("sig" in td.classes) == (d["ci_low"] > 0 or d["ci_high"] < 0)
    p = cell(table, EVIL, f"{OOD}/p_acc1")
    assert float(p.attrs["data-sort"]) == pytest.approx(comp["test"]["p_value"])
    assert f"{OOD}/d_ood_auroc" in header_keys(table) and f"{ID}/d_ood_auroc" not in \
        header_keys(table)


def test_leaderboard_has_the_effective_robustness_column(site: dict) -> None:
    table = site["dom"].by_id("suite-quickstart-leaderboard")
    assert f"{OOD}/er" in header_keys(table) and f"{ID}/er" not in header_keys(table)
    er = site["doc"]["effective_robustness"]["models"]
    for m in MODELS[:1] + (EVIL,):
        lo, hi = er[m][OOD]["er_interval"]  # the fitted line's 95% band
        assert cell(table, m, f"{OOD}/er").text() == f"{er[m][OOD]['er']:.2f} [{lo:.2f}, {hi:.2f}]"


def test_mce_table_and_charts(site: dict) -> None:
    table = site["dom"].by_id("suite-quickstart-mce")
    assert cell(table, "tiny-clip-cifar10", f"{OOD}/mce").text() == "100.0"
    alts = [img.attrs["alt"] for img in site["dom"].all("img")]
    assert any(a.startswith(f"scatter of {OOD} against {ID} top-1 accuracy on logit axes")
               for a in alts)
    assert sum("reliability diagrams of 3 models" in a for a in alts) == 2  # one per dataset
    assert any("one small chart per corruption (15)" in a for a in alts)
    scatter = next(img for img in site["dom"].all("img") if "logit axes" in img.attrs["alt"])
    svg = base64.b64decode(scatter.attrs["src"].split(",", 1)[1]).decode()
    assert "y = x" in svg and "fit: logit(OOD)" in svg  # legend text of both lines


def test_hostile_names_stay_text_and_markdown_has_the_analysis(site: dict) -> None:
    assert EVIL not in site["html"] and "<i>" not in site["html"]
    assert not site["dom"].all("i")
    md = (site["out"] / "leaderboard.md").read_text(encoding="utf-8")
    assert "### paired deltas vs reference" in md and "### effective robustness" in md


def test_a_stale_analysis_says_so(site: dict, tmp_path: Path) -> None:
    root = tmp_path / "results"
    shutil.copytree(site["root"], root)
    path = root / "quickstart" / "tiny-clip-cifar10" / f"{ID}.json"
    rec = json.loads(path.read_text())
    rec["cell_key"] = "0" * 32  # the cell was recomputed after the analysis
    write_record_json(path, {k: v for k, v in rec.items() if k != "integrity"})
    html = render_report(root, tmp_path / "out").read_text(encoding="utf-8")
    assert "was computed before 1 cell(s) changed" in html and "robench analyze" in html


def test_leaderboard_on_a_phone(site: dict) -> None:
    if not CHROMIUM.exists():
        if os.environ.get("ROBENCH_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing but ROBENCH_REQUIRE_BROWSER is set")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                     headless=True)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})
            page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(
                ("file:", "data:")) else r.abort())
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(site["index"].as_uri(), wait_until="load")
            # the page itself never scrolls sideways; the table scrolls inside its box
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            box = page.locator("#suite-quickstart-leaderboard").locator("xpath=..")
            assert box.evaluate("b => b.scrollWidth > b.clientWidth")
            box.evaluate("b => { b.scrollLeft = b.scrollWidth; }")
            first = page.locator("#suite-quickstart-leaderboard tbody tr:first-child td").first
            last = page.locator("#suite-quickstart-leaderboard tbody tr:first-child td").last
            box_rect = box.bounding_box()
            f, lr = first.bounding_box(), last.bounding_box()
            # scrolled to the end: the model column is still pinned at the left edge...
            assert abs(f["x"] - box_rect["x"]) < 2 and f["width"] < 160
            # ...and the last column (ER) is fully on screen, beside it, not under it
            assert lr["x"] >= f["x"] + f["width"] - 1 and lr["x"] + lr["width"] <= 390 + 1
            assert last.text_content().strip()  # a number, reachable
            font = first.evaluate("c => parseFloat(getComputedStyle(c).fontSize)")
            assert font >= 12
            page.screenshot(path=str(site["out"] / "phone.png"))
        finally:
            browser.close()
    assert errors == []
