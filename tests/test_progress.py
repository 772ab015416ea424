"""Progress output: tqdm on a terminal, a few plain lines in a pipe, nothing when quiet."""

from __future__ import annotations

import io

import pytest
from conftest import run_cli

from robench import progress as P  # noqa: N812
from robench.registry import get_dataset, template_set


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_short_step_in_a_pipe_is_one_line_with_count_and_rate():
    out, clock = io.StringIO(), Clock()
    bar = P.LineProgress(total=2000, desc="features x", unit="img", file=out, clock=clock)
    for _ in range(20):
        clock.t += 0.1
        bar.update(100)
    bar.close()
    bar.close()  # idempotent, as tqdm's
    assert out.getvalue() == "features x: 2000 img in 2.0s, 1000 img/s\n"


def test_long_step_prints_about_every_tenth_never_a_carriage_return():
    out, clock = io.StringIO(), Clock()
    bar = P.LineProgress(total=37500, desc="features c", unit="img", file=out, clock=clock)
    for _ in range(375):  # 100 img per 1.2 s: 7.5 min in all
        clock.t += 1.2
        bar.update(100)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert 8 <= len(lines) <= 12, lines
    assert lines[0].startswith("features c:   2% 900/37500 img, 10.8s, 83 img/s, ~7m")
    assert "50%" in out.getvalue() and lines[-1] == "features c: 37500 img in 7m30s, 83 img/s"
    # lines at least LINE_INTERVAL apart
    assert all(" 0%" not in line for line in lines)


def test_unknown_total_postfix_and_iteration():
    out, clock = io.StringIO(), Clock()
    bar = P.LineProgress(iter(range(5)), desc="steps", unit="step", file=out, clock=clock)
    bar.set_postfix(loss="0.5")
    clock.t = 1.0
    assert list(bar) == [0, 1, 2, 3, 4]
    assert out.getvalue() == "steps: 5 step in 1.0s, 5 step/s (loss=0.5)\n"


def test_interrupted_step_says_where_it_stopped_and_bytes_are_scaled():
    out, clock = io.StringIO(), Clock()
    with P.LineProgress(total=4 * 2**20, unit="B", unit_scale=True, unit_divisor=1024,
                        desc="a.tar", file=out, clock=clock) as bar:
        clock.t = 2.0
        bar.update(2**20)
    assert out.getvalue() == "a.tar: 1.00M/4.00MB in 2.0s, 512kB/s (stopped)\n"


def test_nothing_done_prints_nothing():
    out = io.StringIO()
    P.LineProgress(file=out).close()
    assert out.getvalue() == ""


def test_factory_picks_by_terminal_and_verbosity(monkeypatch):
    from tqdm import tqdm

    monkeypatch.setattr(P, "is_tty", lambda stream=None: False)
    assert isinstance(P.progress_bar(total=3, desc="d"), P.LineProgress)
    assert P.progress_bar(range(3)).total == 3  # total taken from the iterable
    monkeypatch.setattr(P, "is_tty", lambda stream=None: True)
    bar = P.progress_bar(total=3, desc="d", leave=False)
    assert isinstance(bar, tqdm) and not bar.disable
    bar.close()
    assert P.progress_bar(total=3, disable=True).disable
    with P.verbosity_level("quiet"):
        assert P.progress_bar(total=3).disable
    assert P.verbosity() == "normal"


def test_echo_respects_quiet(capsys):
    P.echo("cell done")
    with P.verbosity_level("quiet"):
        P.echo("hidden")
    assert capsys.readouterr().out == "cell done\n"
    with pytest.raises(ValueError):
        P.set_verbosity("loud")


def test_piped_run_log_is_lines_and_quiet_drops_them(tmp_path):
    """A piped run (stderr is not a TTY here) writes one line per step, no bar frames;
    progress=false drops the step lines, verbosity=quiet also the per-cell lines."""
    common = ("run", "suite=smoke", f"cache_dir={tmp_path / 'c'}", "device=cpu",
              "metrics.bootstrap=0", "model.num_workers=0", "datasets=[cifar10-subset-val]",
              "id_dataset=null")
    r = run_cli(*common, f"results_dir={tmp_path / 'r1'}")
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "\r" not in r.stdout
    assert "features cifar10-subset-val: 500 img in" in r.stderr
    n = len(template_set(get_dataset("cifar10-subset-val").templates))
    assert f"text head: 10 classes x {n} templates: {10 * n} prompt in" in r.stderr
    assert "[1/1] tiny-random x cifar10-subset-val" in r.stdout
    assert len(r.stderr) < 1000, r.stderr

    r = run_cli(*common, f"results_dir={tmp_path / 'r2'}", "progress=false", "force=true")
    assert r.returncode == 0 and "features" not in r.stderr and "[1/1]" in r.stdout

    r = run_cli(*common, f"results_dir={tmp_path / 'r3'}", "verbosity=quiet", "force=true")
    assert r.returncode == 0 and r.stderr == ""
    assert "[1/1]" not in r.stdout and "tiny-random" in r.stdout  # the final table stays
    r = run_cli("-q", *common, f"results_dir={tmp_path / 'r3'}", "force=true")
    assert r.returncode == 0 and r.stderr == "" and "[1/1]" not in r.stdout


def test_a_notebook_gets_tqdm_bars_not_lines(monkeypatch):
    import sys
    import types
    import warnings

    from tqdm import tqdm

    class ZMQInteractiveShell:  # what IPython's get_ipython() returns in a Jupyter kernel
        pass

    fake = types.ModuleType("IPython")
    fake.get_ipython = ZMQInteractiveShell
    monkeypatch.setitem(sys.modules, "IPython", fake)
    monkeypatch.setattr(P, "is_tty", lambda stream=None: False)
    assert P.in_notebook()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tqdm.auto warns when ipywidgets is absent
        bar = P.progress_bar(total=3, desc="d")
    assert isinstance(bar, tqdm) and not isinstance(bar, P.LineProgress)
    bar.close()
    monkeypatch.delitem(sys.modules, "IPython")
    assert not P.in_notebook()
