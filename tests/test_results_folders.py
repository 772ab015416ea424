"""``robench results`` (and ``robench.load_results``) over a folder holding the same suite twice
(e.g. runs/ and an older copy): a ``folder`` column tells the duplicate cells apart, and each
folder gets its own averages. One folder: no such column."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO

import robench

BASELINE = REPO / "results" / "quickstart"
MODELS = ("tiny-clip-cifar10", "tiny-clip-ts")


@pytest.fixture(scope="module")
def two_copies(tmp_path_factory) -> Path:
    """<root>/new/quickstart and <root>/old/quickstart, two models' records each."""
    root = tmp_path_factory.mktemp("folders")
    for copy in ("new", "old"):
        for model in MODELS:
            shutil.copytree(BASELINE / model, root / copy / "quickstart" / model)
    return root


def test_cells_read_from_two_folders_say_which_folder(two_copies: Path, capsys) -> None:
    from robench.cli import main

    assert main(["results", "--dir", str(two_copies), "--format", "csv"]) == 0
    from io import StringIO

    frame = pd.read_csv(StringIO(capsys.readouterr().out))
    cells = frame[~frame.dataset.isin(["avg shift", "mean over all datasets"])]
    assert set(cells.folder) == {"new/quickstart", "old/quickstart"}
    assert not cells.duplicated(["model", "dataset", "folder"]).any()
    assert cells.duplicated(["model", "dataset"]).any()  # what the column tells apart
    averages = frame[~frame.index.isin(cells.index)]
    assert set(averages.folder) == {"new/quickstart", "old/quickstart"}
    assert main(["results", "--dir", str(two_copies)]) == 0
    text = capsys.readouterr().out
    header = text.splitlines()[0].split()
    assert header[:3] == ["model", "dataset", "folder"]
    assert "folder new/quickstart: suite quickstart" in text
    assert "folder old/quickstart: suite quickstart" in text
    assert main(["results", "--dir", str(two_copies), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["folder"] for r in rows} == {"new/quickstart", "old/quickstart"}


def test_load_results_has_the_folder_column_only_for_several_folders(two_copies: Path) -> None:
    both = robench.load_results(two_copies)
    assert sorted(set(both.folder)) == ["new/quickstart", "old/quickstart"]
    assert len(both) == 2 * len(robench.load_results(two_copies / "new"))
    one = robench.load_results(two_copies / "new")
    assert "folder" not in one.columns


def test_one_folder_keeps_the_plain_table(two_copies: Path, capsys) -> None:
    from robench.cli import main

    assert main(["results", "--dir", str(two_copies / "new" / "quickstart")]) == 0
    text = capsys.readouterr().out
    assert "folder" not in text.splitlines()[0]
    assert "folder new" not in text
