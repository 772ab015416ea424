"""The Python API: run / evaluate / load_results as DataFrames, and a user's own nn.Module."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from conftest import REPO

import robench
from robench.errors import RobenchError
from robench.models.backbone import state_dict_hash
from robench.models.heads import LinearHead
from robench.registry import get_dataset, template_set

TF = T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.25] * 3)])
VAL = "cifar10-subset-val"  # 500 real CIFAR-10 images shipped with robench


def small_cnn(seed: int = 0, outputs: int = 10) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(8, outputs))


@pytest.fixture()
def where(tmp_path, monkeypatch):
    """Records and caches in a fresh folder, as a new notebook would have them."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path


def readme_python() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(tmp_path):
    """The README's Python example, verbatim, from an empty folder with a fresh cache."""
    code = readme_python()
    assert "robench.run(" in code and "robench.evaluate(" in code
    assert "robench.CustomModel(" in code and "robench.load_results(" in code
    env = {"ROBENCH_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, **env}, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "tiny-clip-cifar10" in r.stdout and "my-cnn" in r.stdout
    assert (tmp_path / "runs" / "quickstart" / "tiny-clip-cifar10" /
            "cifar10-subset-test.json").is_file()
    assert (tmp_path / "runs" / "evaluate" / "my-cnn" / f"{VAL}.json").is_file()


def test_public_names_are_exported_typed_and_lazy():
    for name in ("run", "evaluate", "load_results", "CustomModel", "RobenchError", "ModelSpec",
                 "DatasetSpec", "__version__"):
        assert name in robench.__all__ and getattr(robench, name) is not None
    assert (REPO / "robench" / "py.typed").is_file()
    import typing

    import pandas as pd

    assert typing.get_type_hints(robench.run)["return"] is pd.DataFrame
    code = "import sys, robench; print('torch' in sys.modules, 'pandas' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["False", "False"]  # `import robench` (the CLI) stays light


def test_run_returns_the_records_as_a_frame(where):
    df = robench.run("smoke", overrides=[f"datasets=[{VAL}]", "id_dataset=null",
                                         "metrics.bootstrap=20", "device=cpu"])
    assert list(df["model"]) == ["tiny-random"] and list(df["dataset"]) == [VAL]
    rec = json.loads((where / "runs" / "smoke" / "tiny-random" / f"{VAL}.json").read_text())
    row = df.iloc[0]
    for key in ("acc1", "acc1_ci_low", "acc1_ci_high", "ece", "ece_ci_low", "auroc", "nll"):
        assert row[key] == pytest.approx(rec["metrics"][key], abs=1e-12), key
    assert row["n"] == 500 and row["method"] == "zeroshot"
    again = robench.load_results(where / "runs" / "smoke")
    assert again.equals(df)
    with pytest.raises(RobenchError, match="list of key=value"):
        robench.run("smoke", overrides="device=cpu")


def test_load_results_of_the_committed_baseline():
    df = robench.load_results(REPO / "results" / "quickstart")
    assert len(df) == 34 and {"acc1_ci_low", "ece_ci_high", "auroc_ci_low"} <= set(df.columns)
    with pytest.raises(RobenchError, match="does not exist"):
        robench.load_results(REPO / "nope")


def test_custom_classifier_scores_its_own_logits_and_caches_by_weights(where, tmp_path):
    net = small_cnn()
    mine = robench.CustomModel(name="my-cnn", classifier=net, preprocess=TF)
    df = robench.evaluate(model=mine, datasets=[VAL], device="cpu", metrics={"bootstrap": 0})
    record = where / "runs" / "evaluate" / "my-cnn" / f"{VAL}.json"
    rec = json.loads(record.read_text())
    assert rec["protocol"]["method"] == "classifier"
    assert rec["method"]["head"]["head"] == "classifier"
    assert rec["provenance"]["arch"] == "custom:Sequential"
    assert rec["provenance"]["weights_hash"] == state_dict_hash(mine.network())

    # the scored outputs are the network's own logits
    from robench.data import load_dataset
    from robench.registry import DATASETS, dataset_root

    spec = DATASETS[VAL]
    src = load_dataset(spec.family, dataset_root(VAL, spec, "data", {}), VAL)
    with torch.no_grad():
        x = torch.stack([TF(src.load_image(i)) for i in range(len(src))])
        want = net(x).numpy()
    with np.load(record.with_suffix(".npz")) as z:
        np.testing.assert_allclose(z["true_logit"], want[np.arange(len(want)), z["target"]],
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(z["topk_logit"][:, 0], want.max(1), rtol=1e-5, atol=1e-5)
        assert (z["topk_index"][:, 0] == want.argmax(1)).mean() > 0.99
    assert df.iloc[0]["acc1"] == pytest.approx(100 * (want.argmax(1) == src.labels).mean())

    # the same weights, saved and loaded into a new module: the same model, nothing recomputed
    torch.save(net.state_dict(), tmp_path / "w.pt")
    reloaded = small_cnn(seed=99)
    reloaded.load_state_dict(torch.load(tmp_path / "w.pt"))
    mtime = record.stat().st_mtime_ns
    again = robench.evaluate(model=robench.CustomModel(name="my-cnn", classifier=reloaded,
                                                       preprocess=TF),
                             datasets=[VAL], device="cpu", metrics={"bootstrap": 0})
    assert record.stat().st_mtime_ns == mtime and again.equals(df)

    # other weights: a new cell
    other = robench.evaluate(model=robench.CustomModel(name="my-cnn", classifier=small_cnn(7),
                                                       preprocess=TF),
                             datasets=[VAL], device="cpu", metrics={"bootstrap": 0})
    assert record.stat().st_mtime_ns != mtime and other.iloc[0]["nll"] != df.iloc[0]["nll"]


def test_classifier_logits_survive_the_float16_feature_cache():
    """hi + lo of the cached pair gives the float32 logits back (~2^-22 relative)."""
    net = small_cnn()
    bb = robench.CustomModel(name="c", classifier=net, preprocess=TF).backbone("cpu")
    x = torch.randn(16, 3, 32, 32)
    pair = bb.encode_images(x).numpy().astype(np.float16)  # as features.py stores them
    head = LinearHead(weight=np.concatenate([np.eye(10)] * 2).astype(np.float32),
                                 scale=1.0, classnames=list("abcdefghij"))
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(head.logits(pair), want, rtol=1e-6, atol=1e-7)
    assert np.abs(pair[:, :10].astype(np.float32) - want).max() > 1e-5  # fp16 alone is not enough


def test_custom_encoder_with_linear_probe_and_temperature_scaling(where):
    enc = small_cnn()[:4]  # conv features, no classifier layer
    probe = {"train_on": "cifar10-subset-probe", "val_on": VAL}
    df = robench.evaluate(model=robench.CustomModel(name="my-enc", image_encoder=enc,
                                                    preprocess=TF, options=probe),
                          datasets=["cifar10-subset-test"], device="cpu",
                          metrics={"bootstrap": 0})  # not VAL: the probe selects C on it
    assert df.iloc[0]["method"] == "linear-probe" and df.iloc[0]["acc1"] > 20  # chance: 10
    ts = robench.CustomModel(name="my-cnn-ts", classifier=small_cnn(), preprocess=TF,
                             method="temperature-scaling",
                             options={"calibrate_on": "cifar10-subset-probe"})
    df = robench.evaluate(model=ts, datasets=[VAL], device="cpu", metrics={"bootstrap": 0})
    rec = json.loads((where / "runs" / "evaluate" / "my-cnn-ts" / f"{VAL}.json").read_text())
    head = rec["method"]["head"]
    assert head["base_method"] == "classifier" and head["temperature"] > 0


class TextEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.emb = torch.nn.Embedding(128, 8)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.emb(tokens).mean(dim=1)


def char_tokens(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[ord(c) % 128 for c in t[:40].ljust(40)] for t in texts])


def test_custom_image_and_text_encoders_give_a_zero_shot_head(where):
    mine = robench.CustomModel(name="my-clip", image_encoder=small_cnn(outputs=8), preprocess=TF,
                               text_encoder=TextEncoder(), tokenizer=char_tokens,
                               logit_scale=20.0)
    df = robench.evaluate(model=mine, datasets=[VAL], device="cpu", metrics={"bootstrap": 0})
    rec = json.loads((where / "runs" / "evaluate" / "my-clip" / f"{VAL}.json").read_text())
    n_templates = len(template_set(get_dataset(VAL).templates))  # the split's prompt set
    assert df.iloc[0]["method"] == "zeroshot" and rec["protocol"]["n_templates"] == n_templates
    assert rec["method"]["head"]["logit_scale"] == 20.0


def test_evaluate_accepts_names_declarations_and_specs(where):
    from robench.registry import ModelSpec

    kw = {"device": "cpu", "metrics": {"bootstrap": 0}, "id_dataset": None}
    by_name = robench.evaluate(model="tiny-random", datasets=VAL, **kw)
    by_decl = robench.evaluate(model={"name": "tr", "arch": "robench-tiny-vit"}, datasets=[VAL],
                               overrides=["model.batch_size=100"], **kw)
    by_spec = robench.evaluate(model=ModelSpec("robench-tiny-vit"), datasets=[VAL], **kw)
    assert list(by_spec["model"]) == ["robench-tiny-vit"]
    for other in (by_decl, by_spec):  # the same random init (seed 0): the same numbers
        assert other.iloc[0]["acc1"] == by_name.iloc[0]["acc1"]


@pytest.mark.parametrize(("make", "needle"), [
    (lambda: robench.CustomModel(name="x", preprocess=TF), "exactly one of classifier"),
    (lambda: robench.CustomModel(name="x", preprocess=TF, classifier=small_cnn(),
                                 image_encoder=small_cnn()), "exactly one of classifier"),
    (lambda: robench.CustomModel(name="x", preprocess=TF, classifier=small_cnn(),
                                 method="finetune"), "does not apply"),
    (lambda: robench.CustomModel(name="x", preprocess=TF, image_encoder=small_cnn(),
                                 method="zeroshot"), "does not apply"),
    (lambda: robench.CustomModel(name="x", preprocess=TF, image_encoder=small_cnn(),
                                 text_encoder=TextEncoder()), "needs its tokenizer"),
    (lambda: robench.evaluate(model=robench.CustomModel(name="x", preprocess=TF,
                                                        classifier=small_cnn(outputs=5)),
                              datasets=[VAL], device="cpu"), "outputs 5 logits"),
    (lambda: robench.evaluate(model=robench.CustomModel(name="x", preprocess=lambda im: 3,
                                                        classifier=small_cnn()),
                              datasets=[VAL], device="cpu"), "not a CHW tensor"),
    (lambda: robench.evaluate(model=small_cnn(), datasets=[VAL]), "robench.CustomModel"),
    (lambda: robench.evaluate(model="tiny-random", datasets=[VAL], models=["x"]), "not models="),
    (lambda: robench.evaluate(model="tiny-random", datasets=[VAL], devise="cpu"),
     "Did you mean 'device'"),
    (lambda: robench.evaluate(model="tiny-random", datasets=[VAL], device="gpu"),
     "unknown device 'gpu'"),
])
def test_api_errors_name_the_problem_and_the_fix(where, make, needle):
    with pytest.raises(RobenchError, match=re.escape(needle)) as e:
        make()
    assert e.value.fix
