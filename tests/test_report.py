"""``robench report``: the rendered leaderboard, from synthetic but schema-true result records.

The HTML is checked structurally (cells, intervals, best-value highlighting by direction,
escaping, nulls, the -C breakdown, provenance, definitions), then in a real headless Chromium with
every network request aborted: no request other than file:/data:, no console error, sorting by
clicking a header, charts with a size, a screenshot.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import meaning_unchecked

from robench.errors import RobenchError
from robench.metrics import METRIC_INFO, compute_all
from robench.report import render_report
from robench.report.render import DASH
from robench.results import write_record_json

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
EVIL = "<b>x</b>"  # a model name that is also HTML: must show as text, never as markup
B32, B16 = "clip-b32", "clip-b16"
SHIFTS = "suite-shifts"  # the section id the report gives suite "shifts"

# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _hand_made_numbers() -> Iterator[None]:
    """The records here carry numbers chosen to test the rendering (best-value marks, nulls,
    escaping), which no per-sample outputs give: the report reads them with the check of their
    meaning switched off (tests/test_record_meaning.py tests that it refuses such records)."""
    with meaning_unchecked():
        yield


# The keys compute_all really produces (so the records stay schema-true if it grows a key).
_rng = np.random.default_rng(0)
BASE_METRICS = compute_all(_rng.normal(size=(64, 10)), _rng.integers(0, 10, 64), n_bootstrap=5)


def metrics(acc1: float, ece: float, auroc: float | None, *, intervals: bool = True,
            ood: float | None = None, n: int = 1000) -> dict:
    """A metrics dict with chosen headline values; +-2 / +-20% / +-0.02 intervals."""
    m = dict(BASE_METRICS, n=n, acc1=acc1, ece=ece, auroc=auroc)
    m.update(acc1_ci_low=acc1 - 2, acc1_ci_high=acc1 + 2, ece_ci_low=ece * 0.8,
             ece_ci_high=ece * 1.2, auroc_ci_low=None if auroc is None else auroc - 0.02,
             auroc_ci_high=None if auroc is None else auroc + 0.02)
    if not intervals:  # a -C headline: a mean over groups carries no interval
        m = {k: v for k, v in m.items() if not k.endswith(("_ci_low", "_ci_high"))}
    if ood is not None:
        m["ood_auroc"] = ood
    return m


def make_record(suite: str, model: str, dataset: str, mets: dict, *, arch: str = "ViT-B-32",
                groups: dict | None = None, summary: list[str] | None = None) -> dict:
    """A record shaped like the runner's (robench.runner.Runner.score_cell)."""
    return {
        "suite": suite, "model": model, "dataset": dataset, "cell_key": "0" * 32,
        "created": "2026-01-02T03:04:05Z", "metrics": mets, "groups": groups,
        "protocol": {
            "method": "zeroshot", "confidence": "msp", "ece_bins": 15, "bootstrap": 200,
            "alpha": 0.05, "scored_classes": "all", "n_classes_scored": 10,
            "summary": "mean over groups " + ",".join(summary) if summary else "all samples",
            "id_dataset": "cifar10", "auroc": "misclassification detection",
            "ood_auroc": "ID vs this set" if "ood_auroc" in mets else None,
            "head": "zeroshot", "template_set": "cifar", "n_templates": 18, "logit_scale": 100.0,
        },
        "data": {"root": "/data/" + dataset, "manifest_hash": "ab" * 32, "n": mets["n"],
                 "n_bad": 0, "bad_samples": [], "feature_key": "f" * 32},
        "provenance": {
            "robench": "0.1.0", "torch": "2.14.1", "open_clip": "3.3.0", "numpy": "2.4.6",
            "python": "3.11.7", "git_sha": "0123456789abcdef0123456789abcdef01234567",
            "device": "cpu", "dtype": "fp32", "batch_size": 256, "seed": 0, "arch": arch,
            "pretrained": "openai", "weights_hash": "cd" * 32, "logit_scale": 100.0,
            "preprocess": "Compose(Resize(224))",
        },
    }


def write(root: Path, rec: dict) -> None:
    # the record alone: the report reads no per-sample outputs
    # hostile names (markup, slashes) live in the record; the file sits at a safe path, as a
    # record written elsewhere and copied into a results folder would
    safe = [str(rec[k]) if re.fullmatch(r"[\w.+-]+", str(rec[k])) and ".." not in str(rec[k])
            else hashlib.sha256(str(rec[k]).encode()).hexdigest()[:12]
            for k in ("suite", "model", "dataset")]
    write_record_json(root / safe[0] / safe[1] / f"{safe[2]}.json", rec)


def c_groups(offset: float, ece: float) -> tuple[dict, list[str]]:
    """fog/snow (in the headline) and spatter (kept, not averaged) x severities 1-3."""
    groups, summary = {}, []
    for corruption in ("fog", "snow", "spatter"):
        for s in (1, 2, 3):
            key = f"{corruption}/{s}"
            acc = {"fog": offset, "snow": offset + 2, "spatter": offset / 2}[corruption]
            groups[key] = metrics(acc - 10 * (s - 1), ece * s, 0.7, ood=0.6, n=100)
            if corruption != "spatter":
                summary.append(key)
    return groups, summary


def write_shifts(root: Path) -> None:
    """Suite "shifts": 3 models x (cifar10, cifar10-c with groups, cifar10-v2 with ood_auroc);
    EVIL has a null AUROC on cifar10 and was not run on cifar10-v2."""
    write(root, make_record("shifts", B32, "cifar10", metrics(80.0, 0.050, 0.800)))
    write(root, make_record("shifts", B16, "cifar10", metrics(90.0, 0.080, 0.850),
                            arch="ViT-B-16"))
    write(root, make_record("shifts", EVIL, "cifar10", metrics(50.0, 0.300, None)))
    for model, offset, arch in ((B32, 70.0, "ViT-B-32"), (B16, 80.0, "ViT-B-16"),
                                (EVIL, 40.0, "ViT-B-32")):
        groups, summary = c_groups(offset, 0.02)
        head = metrics(offset - 9.0, 0.04, 0.7, intervals=False, ood=0.6, n=600)
        write(root, make_record("shifts", model, "cifar10-c", head, arch=arch, groups=groups,
                                summary=summary))
    write(root, make_record("shifts", B32, "cifar10-v2", metrics(70.0, 0.06, 0.75, ood=0.60)))
    write(root, make_record("shifts", B16, "cifar10-v2", metrics(78.0, 0.07, 0.78, ood=0.70),
                            arch="ViT-B-16"))


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Suite "shifts" plus a one-cell suite "quick", rendered once for the whole module."""
    root = tmp_path_factory.mktemp("results")
    write_shifts(root)
    write(root, make_record("quick", "tiny", "cifar10", metrics(12.0, 0.02, 0.51)))
    subset = make_record("quick", "tiny", "imagenet-r", metrics(5.0, 0.1, 0.55))
    subset["protocol"].update(scored_classes=[1, 2, 4] + list(range(500, 696)) + [999],
                              n_classes_scored=200)
    write(root, subset)
    out = tmp_path_factory.mktemp("report")
    index = render_report(root, out, title="robench <test> & co")
    html = index.read_text(encoding="utf-8")
    return {"root": root, "out": out, "index": index, "html": html, "dom": parse(html)}


# --------------------------------------------------------------------------------------------
# A minimal DOM (the standard library's HTMLParser; no bs4/lxml in the test environment)
# --------------------------------------------------------------------------------------------

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Node | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node | str] = []

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def text(self) -> str:
        """Text content, whitespace collapsed (entities already decoded)."""
        parts = [c if isinstance(c, str) else c.text() for c in self.children]
        return " ".join(" ".join(parts).split())

    def iter(self):
        for c in self.children:
            if isinstance(c, Node):
                yield c
                yield from c.iter()

    def all(self, tag: str, cls: str | None = None) -> list[Node]:
        return [n for n in self.iter() if n.tag == tag and (cls is None or cls in n.classes)]

    def by_id(self, ident: str) -> Node:
        found = [n for n in self.iter() if n.attrs.get("id") == ident]
        assert len(found) == 1, f"expected one element with id {ident!r}, found {len(found)}"
        return found[0]


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {}, None)
        self.cur = self.root

    def handle_starttag(self, tag: str, attrs: list) -> None:
        node = Node(tag, dict(attrs), self.cur)
        self.cur.children.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self.cur.children.append(Node(tag, dict(attrs), self.cur))

    def handle_endtag(self, tag: str) -> None:
        node = self.cur
        while node is not None and node.tag != tag:
            node = node.parent
        assert node is not None and node.parent is not None, f"stray </{tag}>"
        self.cur = node.parent

    def handle_data(self, data: str) -> None:
        self.cur.children.append(data)


def parse(html: str) -> Node:
    b = _Builder()
    b.feed(html)
    b.close()
    assert b.cur is b.root, f"unclosed <{b.cur.tag}>"
    return b.root


def header_keys(table: Node) -> list[str]:
    return [th.attrs["data-key"] for th in table.all("tr", "cols")[0].all("th")]


def body_rows(table: Node) -> list[list[Node]]:
    return [tr.all("td") for tr in table.all("tbody")[0].all("tr")]


def cell(table: Node, row_label: str, key: str) -> Node:
    """The td of column ``key`` (data-key) in the row whose first cell reads ``row_label``."""
    col = header_keys(table).index(key)
    rows = [r for r in body_rows(table) if r[0].text() == row_label]
    assert len(rows) == 1, f"{len(rows)} rows labelled {row_label!r}"
    return rows[0][col]


# --------------------------------------------------------------------------------------------
# HTML structure
# --------------------------------------------------------------------------------------------


def test_leaderboard_cells_show_value_and_interval(report: dict) -> None:
    table = report["dom"].by_id(f"{SHIFTS}-leaderboard")
    rows = body_rows(table)
    # by avg shift acc1 (cifar10-c, cifar10-v2; the ID set cifar10 left out); EVIL lacks v2
    assert [r[0].text() for r in rows] == [B16, B32, EVIL]
    assert cell(table, B16, "cifar10/acc1").text() == "90.0 [88.0, 92.0]"
    assert cell(table, B32, "cifar10/ece").text() == "0.050 [0.040, 0.060]"
    assert cell(table, B32, "cifar10/auroc").text() == "0.800 [0.780, 0.820]"
    assert cell(table, B16, "cifar10-c/acc1").text() == "71.0"  # a mean over groups: no interval
    assert cell(table, B16, "cifar10-v2/ood_auroc").text() == "0.700"
    assert cell(table, B16, "avg-shift/acc1").text() == f"{(71 + 78) / 2:.1f}"  # not cifar10
    assert cell(table, B16, "method").text() == "zeroshot"
    # The average's band, then one band per dataset, the ID set first and marked; ood_auroc
    # only where a record of that dataset has it.
    bands = [(th.text(), th.attrs["colspan"]) for th in table.all("th", "band")]
    assert bands == [("avg over 2 shifted sets", "1"), ("cifar10 (ID)", "3"), ("cifar10-c", "4"),
                     ("cifar10-v2", "4")]
    assert "cifar10/ood_auroc" not in header_keys(table)
    # Sort keys are the full-precision values.
    assert float(cell(table, B32, "cifar10/ece").attrs["data-sort"]) == 0.05


def test_best_value_per_column_respects_direction(report: dict) -> None:
    table = report["dom"].by_id(f"{SHIFTS}-leaderboard")
    best = {key: [r[0].text() for r in body_rows(table)
                  if "best" in r[header_keys(table).index(key)].classes]
            for key in header_keys(table)[2:]}
    assert best["cifar10/acc1"] == [B16]  # higher is better; [88, 92] clears [78, 82]
    assert best["cifar10/ece"] == [B32]  # lower is better; [0.04, 0.06] clears [0.064, 0.096]
    assert best["cifar10/auroc"] == [B16]  # EVIL's null never wins
    assert best["cifar10-v2/acc1"] == [B16]  # [76, 80] clears [68, 72]
    # the samples cannot support a winner without intervals: none is marked
    assert best["cifar10-v2/ood_auroc"] == []  # 0.70 vs 0.60, no interval recorded
    assert best["avg-shift/acc1"] == []  # a mean over datasets has no interval
    assert best["cifar10-c/ece"] == []  # every model ties: nothing to win
    # A column with a single value (the one-model suite) has no winner.
    assert not report["dom"].by_id("suite-quick-leaderboard").all("td", "best")


def test_best_is_marked_only_when_the_intervals_do_not_overlap() -> None:
    from robench.report.render import Cell, Column, Row, Table, mark_best

    def table(*cells: tuple[float, float, float]) -> Table:
        rows = [Row([f"m{i}"], [Cell(str(v), v, low=lo, high=hi)])
                for i, (v, lo, hi) in enumerate(cells)]
        return Table("t", [Column("model", numeric=False)], [Column("acc1", direction="higher")],
                     rows)

    clear = table((80, 78, 82), (70, 68, 72.5), (60, 58, 62))
    mark_best(clear)
    assert [r.cells[0].best for r in clear.rows] == [True, False, False]
    overlap = table((80, 78, 82), (79, 77, 81), (60, 58, 62))  # the top two overlap
    mark_best(overlap)
    assert not any(r.cells[0].best for r in overlap.rows)
    lower = table((0.05, 0.04, 0.06), (0.08, 0.07, 0.09))
    lower.columns[0].direction = "lower"
    mark_best(lower)
    assert [r.cells[0].best for r in lower.rows] == [True, False]


def test_null_metrics_and_missing_cells_show_a_dash(report: dict) -> None:
    table = report["dom"].by_id(f"{SHIFTS}-leaderboard")
    for key in ("cifar10/auroc", "cifar10-v2/acc1", "cifar10-v2/ood_auroc", "avg-shift/acc1"):
        td = cell(table, EVIL, key)
        assert td.text() == DASH == "\u2013", key
        assert "null" in td.classes and "best" not in td.classes
        assert td.attrs["data-sort"] == ""  # sorts last whichever the direction
    assert cell(table, EVIL, "cifar10/acc1").text() == "50.0 [48.0, 52.0]"
    texts = {td.text().lower() for td in report["dom"].all("td")}
    assert not texts & {"nan", "none", "null", "inf"}


def test_everything_is_escaped(report: dict) -> None:
    html, dom = report["html"], report["dom"]
    assert EVIL not in html and "<b>" not in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html
    assert not dom.all("b")  # the name never became an element
    assert EVIL in [r[0].text() for r in body_rows(dom.by_id(f"{SHIFTS}-leaderboard"))]
    assert dom.all("title")[0].text() == "robench <test> & co"
    assert "robench &lt;test&gt; &amp; co" in html


def test_one_section_per_suite_with_navigation(report: dict) -> None:
    dom = report["dom"]
    sections = dom.all("section", "suite")
    assert [s.attrs["id"] for s in sections] == ["suite-quick", SHIFTS]
    links = {a.attrs["href"] for a in dom.all("nav")[0].all("a")}
    assert links == {"#suite-quick", f"#{SHIFTS}", "#metrics"}
    assert len(body_rows(dom.by_id("suite-quick-leaderboard"))) == 1


def test_corruption_severity_breakdown(report: dict) -> None:
    dom = report["dom"]
    tables = [t for t in dom.all("table") if t.attrs.get("id", "").endswith("-breakdown")]
    assert len(tables) == 1  # only cifar10-c has groups
    table = tables[0]
    keys = header_keys(table)
    assert keys == ["corruption", "model", "acc1/1", "acc1/2", "acc1/3", "acc1/mean",
                    "ece/1", "ece/2", "ece/3", "ece/mean"]
    rows = body_rows(table)
    assert len(rows) == 3 * (1 + 3)  # per model: the mean row + fog, snow, spatter
    mean_rows = [r for r in rows if r[0].text() == "mean of 2 corruptions"]
    b32 = next(r for r in mean_rows if r[1].text() == B32)
    # fog 70/60/50 and snow 72/62/52 -> 71/61/51; spatter is not in the headline.
    assert [td.text() for td in b32[2:6]] == ["71.0", "61.0", "51.0", "61.0"]
    spatter = [tr for tr in table.all("tbody")[0].all("tr") if tr.all("td")[0].text() == "spatter"]
    assert len(spatter) == 3 and all("extra-row" in tr.classes for tr in spatter)
    # Best model per corruption (not across corruptions): B16 is best on every accuracy column.
    fog = [r for r in rows if r[0].text() == "fog"]
    assert [r[1].text() for r in fog if "best" in r[keys.index("acc1/1")].classes] == [B16]
    # Intervals go to the tooltip in this dense table.
    fog_b32 = next(r for r in fog if r[1].text() == B32)
    assert fog_b32[2].text() == "70.0" and "[68, 72]" in fog_b32[2].attrs["title"]


def test_charts_are_inline_svg_data_uris(report: dict) -> None:
    imgs = report["dom"].all("img")
    # accuracy-vs-ECE scatter per suite + cifar10-c's severity chart and its two grids of small
    # multiples (accuracy, ECE: one panel per corruption)
    assert len(imgs) == 5
    for img in imgs:
        src = img.attrs["src"]
        assert src.startswith("data:image/svg+xml;base64,")
        svg = base64.b64decode(src.split(",", 1)[1]).decode("utf-8")
        assert "<svg" in svg and "<path" in svg
        assert img.attrs["alt"]


def test_page_is_self_contained(report: dict) -> None:
    dom, html = report["dom"], report["html"]
    for node in dom.iter():
        for attr in ("src", "href", "action", "data"):
            value = node.attrs.get(attr)
            if value is not None:
                assert value.startswith(("#", "data:")), (node.tag, attr, value[:60])
    assert not dom.all("link", None) or all(n.attrs.get("rel") == "icon" for n in dom.all("link"))
    csp = [m for m in dom.all("meta") if m.attrs.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0].attrs["content"]
    assert "http://" not in html and "https://" not in html
    assert all("src" not in s.attrs for s in dom.all("script"))


def test_provenance_panel_and_metric_definitions(report: dict) -> None:
    dom = report["dom"]
    section = dom.by_id(SHIFTS)
    common = dict(zip([dt.text() for dt in section.all("dt")],
                      [dd.text() for dd in section.all("dd")], strict=True))
    assert common["torch"] == "2.14.1" and common["open_clip"] == "3.3.0"
    assert common["robench"] == "0.1.0" and common["git sha"] == "0123456789ab"
    assert common["device"] == "cpu" and common["dtype"] == "fp32"
    assert common["template set"] == "cifar" and common["ECE bins"] == "15"
    assert common["bootstrap resamples"] == "200" and common["scored classes"] == "all 10"
    varying = dom.by_id(f"{SHIFTS}-provenance")
    assert "arch" in header_keys(varying)  # ViT-B-32 vs ViT-B-16
    assert "arch" not in common and "headline" in header_keys(varying)
    assert cell(dom.by_id("suite-quick-leaderboard"), "tiny", "cifar10/acc1").text() == \
        "12.0 [10.0, 14.0]"
    quick = dom.by_id("suite-quick-provenance")
    classes = {r[1].text(): r[header_keys(quick).index("scored classes")].text()
               for r in body_rows(quick)}
    assert classes == {"cifar10": "all 10",
                       "imagenet-r": "200-class sub-list (indices 1, 2, 4, ..., 999)"}

    defs = {tr.all("td")[0].text(): [td.text() for td in tr.all("td")[1:]]
            for tr in dom.by_id("metric-definitions").all("tbody")[0].all("tr")}
    for key in ("acc1", "ece", "auroc", "nll", "brier", "fpr95", "ood_auroc"):
        assert key in defs, key
    assert defs["acc1"][0] == METRIC_INFO["acc1"].description
    assert defs["acc5"][0] == METRIC_INFO["acc5"].description  # "<=" survives escaping
    assert defs["ece"][1] == "lower" and defs["auroc"][1] == "higher"
    assert defs["acc1"][2].startswith("Clopper-Pearson") and "200 resamples" in defs["ece"][2]


def _flip_suite(root: Path, id_dataset: str | None) -> None:
    """Suite "flip": "narrow" is best in distribution (95) but worst under shift (40, 44);
    "robust" the other way round (60 ID; 50, 52 shifted)."""
    for model, accs in (("narrow", (95.0, 40.0, 44.0)), ("robust", (60.0, 50.0, 52.0))):
        for dataset, acc in zip(("clean", "shift-a", "shift-b"), accs, strict=True):
            rec = make_record("flip", model, dataset, metrics(acc, 0.05, 0.8))
            rec["protocol"]["id_dataset"] = id_dataset
            write(root, rec)


def test_avg_shift_leaves_the_id_set_out_and_orders_the_leaderboard(tmp_path: Path) -> None:
    _flip_suite(tmp_path / "results", "clean")
    out = tmp_path / "out"
    dom = parse(render_report(tmp_path / "results", out).read_text(encoding="utf-8"))
    table = dom.by_id("suite-flip-leaderboard")
    # mean over the two shifted sets only; over all three "narrow" would lead (59.7 vs 54.0)
    assert [r[0].text() for r in body_rows(table)] == ["robust", "narrow"]
    assert cell(table, "robust", "avg-shift/acc1").text() == "51.0"
    assert cell(table, "narrow", "avg-shift/acc1").text() == "42.0"
    head = table.all("tr", "cols")[0].all("th")[header_keys(table).index("avg-shift/acc1")]
    assert head.text() == "avg shift acc1 (%)"
    assert "shift-a, shift-b" in head.attrs["title"] and "ID set clean is left out" in \
        head.attrs["title"]
    assert [th.text() for th in table.all("th", "band")] == [
        "avg over 2 shifted sets", "clean (ID)", "shift-a", "shift-b"]
    assert cell(table, "narrow", "clean/acc1").text() == "95.0 [93.0, 97.0]"  # kept, apart
    section = dom.by_id("suite-flip")
    assert any(p.text().endswith("as robustness papers report.") and "ordered by avg shift "
               "acc1, the unweighted mean" in p.text() for p in section.all("p"))
    md = (out / "leaderboard.md").read_text(encoding="utf-8")
    assert re.search(r"\| model +\| method +\| clean acc1 \(ID\) +\| avg shift acc1 +\|", md)
    assert re.search(r"\| robust +\| zeroshot +\| 60\.0 +\| 51\.0 +\|", md)
    assert re.search(r"\| narrow +\| zeroshot +\| 95\.0 +\| 42\.0 +\|", md)


def test_without_an_id_set_the_mean_runs_over_all_datasets_and_says_so(tmp_path: Path) -> None:
    _flip_suite(tmp_path / "results", None)
    out = tmp_path / "out"
    dom = parse(render_report(tmp_path / "results", out).read_text(encoding="utf-8"))
    table = dom.by_id("suite-flip-leaderboard")
    assert "avg-shift/acc1" not in header_keys(table)  # nothing says which sets are shifts
    assert [r[0].text() for r in body_rows(table)] == ["narrow", "robust"]
    assert cell(table, "narrow", "mean-all/acc1").text() == f"{(95 + 40 + 44) / 3:.1f}"
    head = table.all("tr", "cols")[0].all("th")[header_keys(table).index("mean-all/acc1")]
    assert head.text() == "mean acc1 over all datasets (%)"
    assert "no ID set is paired" in head.attrs["title"]
    assert [th.text() for th in table.all("th", "band")] == [
        "all datasets (no ID set paired)", "clean", "shift-a", "shift-b"]
    md = (out / "leaderboard.md").read_text(encoding="utf-8")
    assert "no ID set is paired" in md and "mean acc1 over all datasets" in md


def test_csv_and_markdown(report: dict) -> None:
    frame = pd.read_csv(report["out"] / "leaderboard.csv")
    assert len(frame) == 10  # 8 cells of "shifts" + 2 of "quick"
    assert list(frame.columns[:8]) == ["suite", "model", "dataset", "method", "n", "acc1",
                                       "acc1_ci_low", "acc1_ci_high"]
    row = frame[(frame.model == B16) & (frame.dataset == "cifar10")].iloc[0]
    assert row.acc1 == 90.0 and row.ece == 0.08
    assert frame[(frame.model == EVIL) & (frame.dataset == "cifar10")].auroc.isna().all()
    md = (report["out"] / "leaderboard.md").read_text(encoding="utf-8")
    assert "## shifts" in md and "## quick" in md
    assert "90.0 [88.0, 92.0]" in md and DASH in md


def test_rendering_is_deterministic(report: dict, tmp_path: Path) -> None:
    """Same records, same bytes: a committed report only changes when the numbers do."""
    again = render_report(report["root"], tmp_path, title="robench <test> & co")
    assert again.read_text(encoding="utf-8") == report["html"]


def test_many_models_fit_in_a_scrolling_table(tmp_path: Path) -> None:
    root = tmp_path / "results"
    for i in range(30):
        write(root, make_record("big", f"model-{i:02d}-{'x' * 30}", "cifar10",
                                metrics(50.0 + i, 0.01 * (i + 1), 0.6)))
    dom = parse(render_report(root, tmp_path / "out").read_text(encoding="utf-8"))
    table = dom.by_id("suite-big-leaderboard")
    assert len(body_rows(table)) == 30
    assert "scroll" in table.parent.classes
    assert body_rows(table)[0][0].text().startswith("model-29")  # best accuracy first


# --------------------------------------------------------------------------------------------
# Errors and the command line
# --------------------------------------------------------------------------------------------


def test_minimal_and_unusual_records_render(tmp_path: Path) -> None:
    """No protocol/provenance (hand-made or older records), groups without a severity."""
    root = tmp_path / "results"
    write(root, {"suite": "s", "model": "m", "dataset": "plain", "metrics": {"acc1": 50.0}})
    groups = {"day": metrics(60.0, 0.1, 0.7), "night": metrics(40.0, 0.2, None)}
    write(root, {"suite": "s", "model": "m", "dataset": "grouped", "groups": groups,
                 "metrics": metrics(50.0, 0.15, 0.7, intervals=False)})
    dom = parse(render_report(root, tmp_path / "out").read_text(encoding="utf-8"))
    table = dom.by_id("suite-s-leaderboard")
    assert cell(table, "m", "plain/acc1").text() == "50.0"
    assert cell(table, "m", "plain/ece").text() == DASH
    breakdown = dom.by_id("suite-s-grouped-breakdown")
    assert [r[0].text() for r in body_rows(breakdown)] == ["mean of 2 corruptions", "day",
                                                            "night"]
    assert len(dom.all("img")) == 1  # the scatter; no severity axis to draw


def test_errors_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(RobenchError, match="does not exist") as e:
        render_report(tmp_path / "missing", tmp_path / "out")
    assert e.value.fix and "robench run" in e.value.fix
    (tmp_path / "empty").mkdir()
    with pytest.raises(RobenchError, match="no result records") as e:
        render_report(tmp_path / "empty", tmp_path / "out")
    assert e.value.fix and "robench run" in e.value.fix

    root = tmp_path / "results"
    write(root, make_record("s", "m", "d", metrics(50.0, 0.1, 0.6)))
    bad = root / "s" / "m" / "broken.json"
    bad.write_text('{"suite": "s", "metr')
    with pytest.raises(RobenchError, match="broken.json"):
        render_report(root, tmp_path / "out")
    bad.write_text(json.dumps({"hello": "world"}))
    with pytest.raises(RobenchError, match=r"broken\.json is not a robench result record"):
        render_report(root, tmp_path / "out")
    write_record_json(bad, make_record("s", "m", "d2", metrics(1.0, 0.1, 0.5)) |
                      {"groups": ["fog/1"]})
    with pytest.raises(RobenchError, match=r"broken\.json .*groups"):
        render_report(root, tmp_path / "out")
    assert not (tmp_path / "out" / "index.html").exists()


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from robench.cli import main

    root = tmp_path / "results"
    write(root, make_record("s", "m", "d", metrics(50.0, 0.1, 0.6)))
    out = tmp_path / "site"
    assert main(["report", "--results", str(root), "--out", str(out), "--title", "T"]) == 0
    assert "index.html" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"index.html", "leaderboard.csv", "leaderboard.md"}
    assert "<title>T</title>" in (out / "index.html").read_text(encoding="utf-8")
    assert main(["report", "--results", str(tmp_path / "nope"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "fix:" in err


# --------------------------------------------------------------------------------------------
# A real browser, offline
# --------------------------------------------------------------------------------------------


def _column_values(page, table_id: str, col: int) -> list[str]:
    return page.eval_on_selector_all(
        f"#{table_id} tbody tr", f"rows => rows.map(r => r.cells[{col}].textContent.trim())")


def test_report_in_headless_chromium(report: dict, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        if os.environ.get("ROBENCH_REQUIRE_BROWSER"):  # set by .ci/run: CI must not skip it
            pytest.fail(f"{CHROMIUM} is missing but ROBENCH_REQUIRE_BROWSER is set")
        pytest.skip(f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` "
                    "to run the real-browser check of the report")
    from playwright.sync_api import sync_playwright

    leaderboard = f"{SHIFTS}-leaderboard"
    keys = header_keys(report["dom"].by_id(leaderboard))
    requests: list[str] = []
    blocked: list[str] = []
    errors: list[str] = []

    def route(r) -> None:  # abort anything that is not the page itself or an inline data: URI
        if r.request.url.startswith(("file:", "data:")):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                     headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.route("**/*", route)
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(report["index"].as_uri(), wait_until="load")

            assert page.title() == "robench <test> & co"
            assert page.locator(f"#{leaderboard} tbody tr").count() == 3
            assert _column_values(page, leaderboard, 0) == [B16, B32, EVIL]

            def click(key: str) -> list[str]:
                page.click(f'#{leaderboard} th[data-key="{key}"] button')
                return _column_values(page, leaderboard, 0)

            # ECE: lower is better, so the first click puts the lowest first; the second reverses.
            assert click("cifar10/ece") == [B32, B16, EVIL]
            th = page.locator(f'#{leaderboard} th[data-key="cifar10/ece"]')
            assert th.get_attribute("aria-sort") == "ascending"
            assert click("cifar10/ece") == [EVIL, B16, B32]
            assert th.get_attribute("aria-sort") == "descending"
            # AUROC: EVIL's null stays last in both directions.
            assert click("cifar10/auroc") == [B16, B32, EVIL]
            assert click("cifar10/auroc") == [B32, B16, EVIL]
            assert th.get_attribute("aria-sort") == "none"
            col = keys.index("cifar10/acc1")
            assert _column_values(page, leaderboard, col) == \
                ["80.0 [78.0, 82.0]", "90.0 [88.0, 92.0]", "50.0 [48.0, 52.0]"]

            sizes = page.eval_on_selector_all(
                "img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight, "
                       "i.getBoundingClientRect().width, i.getBoundingClientRect().height])")
            assert len(sizes) == 5
            for complete, nw, nh, w, h in sizes:
                assert complete and nw > 0 and nh > 0 and w > 100 and h > 100
            # Wide tables scroll inside their box instead of widening the page.
            assert page.evaluate("document.documentElement.scrollWidth") <= 1400

            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()

    assert blocked == []
    assert requests and all(u.startswith(("file:", "data:")) for u in requests), requests
    assert errors == []


def test_a_generated_c_set_is_labelled_as_generated(tmp_path: Path) -> None:
    """A record's data.generated (a -C set robench made) shows in the -C breakdown's note and
    as a provenance row; a suite without one has no such row."""
    root = tmp_path / "results"
    made = {"protocol": "cifar-c", "resize": "none", "base": "cifar10-subset-test", "seed": 0,
            "note": "generated by robench with the cifar-c protocol (the severity constants of "
                    "make_cifar_c.py), at the native 32x32 size: CIFAR-10-C's recipe, not the "
                    "released CIFAR-10-C"}
    write(root, make_record("g", "m", "cifar10", metrics(80.0, 0.05, 0.8)))
    groups, summary = c_groups(70.0, 0.02)
    rec = make_record("g", "m", "mine-c", metrics(61.0, 0.04, 0.7, intervals=False),
                      groups=groups, summary=summary)
    rec["data"]["generated"] = made
    write(root, rec)
    dom = parse(render_report(root, tmp_path / "out").read_text(encoding="utf-8"))
    notes = [p.text() for p in dom.all("p")]
    assert any("mine-c was generated by robench with the cifar-c protocol" in t
               and "not the released CIFAR-10-C" in t for t in notes), notes
    table = dom.by_id("suite-g-provenance")
    rows = {r[1].text(): r[header_keys(table).index("generated -C set")].text()
            for r in body_rows(table)}
    assert rows == {"cifar10": DASH, "mine-c": "cifar-c, resize none, from cifar10-subset-test"}
    # a suite of released data only: no such row
    plain = tmp_path / "plain"
    write(plain, make_record("p", "m", "cifar10", metrics(80.0, 0.05, 0.8)))
    html = render_report(plain, tmp_path / "out2").read_text(encoding="utf-8")
    assert "generated -C set" not in html
