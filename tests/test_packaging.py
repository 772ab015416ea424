"""What a non-editable install gets: the wheel carries the suites, assets and templates, and
robench runs from any folder with nothing but the installed package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

from robench.config import PACKAGE_SUITES, available_suites, suite_dirs


def test_packaged_suites_are_the_top_level_suites():
    top = sorted(p.name for p in (REPO / "suites").glob("*.yaml"))
    assert top and sorted(p.name for p in PACKAGE_SUITES.glob("*.yaml")) == top
    for name in top:
        assert (PACKAGE_SUITES / name).read_bytes() == (REPO / "suites" / name).read_bytes()


def test_user_folders_take_precedence(tmp_path, monkeypatch):
    mine, env_dir = tmp_path / "suites", tmp_path / "env-suites"
    mine.mkdir()
    env_dir.mkdir()
    (mine / "smoke.yaml").write_text("models: [tiny-random]\ndatasets: [cifar10-subset-val]\n")
    (env_dir / "quickstart.yaml").write_text("models: [tiny-random]\ndatasets: [cifar10]\n")
    (env_dir / "smoke.yaml").write_text("models: [tiny-random]\ndatasets: [cifar10]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROBENCH_SUITES", str(env_dir))
    assert suite_dirs()[:2] == [env_dir, Path.cwd() / "suites"]
    found = available_suites()
    assert found["quickstart"] == env_dir / "quickstart.yaml"  # $ROBENCH_SUITES first
    assert found["smoke"] == env_dir / "smoke.yaml"
    assert found["imagenet-shifts"].parent == PACKAGE_SUITES  # then the packaged ones
    monkeypatch.delenv("ROBENCH_SUITES")
    assert available_suites()["smoke"] == mine / "smoke.yaml"  # ./suites before the package


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel setuptools builds from a copy of the project (the checkout stays clean)."""
    pytest.importorskip("setuptools")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "suites", src / "suites")
    shutil.copytree(REPO / "robench", src / "robench", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", ".robench_manifest.json"))
    out = tmp_path_factory.mktemp("dist")
    code = ("import sys; from setuptools import build_meta as b; "
            f"print(b.build_wheel({str(out)!r}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out / r.stdout.strip().splitlines()[-1]


def test_wheel_ships_suites_assets_and_templates(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for suite in (REPO / "suites").glob("*.yaml"):
        assert f"robench/suites/{suite.name}" in names
    for needed in ("robench/py.typed", "robench/assets/models/robench-tiny-clip-cifar10.pt",
                   "robench/data/metadata/cifar_templates.txt",
                   "robench/models/configs/robench-tiny-vit.json"):
        assert needed in names, needed
    shipped = [n for n in names if n.startswith("robench/assets/cifar10-subset/")]
    assert len([n for n in shipped if n.endswith(".jpg")]) == 10000
    assert not any(n.endswith(".robench_manifest.json") for n in names)
    assert not any(n.startswith(("tests/", "suites/", "results/")) for n in names)


def test_installed_package_runs_from_an_empty_folder(wheel, tmp_path):
    """The wheel unpacked as site-packages, a cwd with nothing in it: list and run."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ROBENCH_SUITES"}
    env |= {"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1",
            "ROBENCH_CACHE": str(tmp_path / "cache")}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "robench.cli", *args], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)

    where = subprocess.run([sys.executable, "-c", "import robench; print(robench.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True).stdout
    assert where.startswith(str(site))
    listed = cli("list", "suites")
    assert listed.returncode == 0 and str(site / "robench" / "suites" / "smoke.yaml") in \
        listed.stdout
    r = cli("run", "suite=smoke", "datasets=[cifar10-subset-val]", "id_dataset=null",
            "metrics.bootstrap=0", "device=cpu", "progress=false")
    assert r.returncode == 0, r.stderr
    assert (work / "runs" / "smoke" / "tiny-random" / "cifar10-subset-val.json").is_file()
