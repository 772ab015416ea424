"""Scoring at scale: exact per-sample outputs, blockwise streaming, rescore, like-with-like OOD."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import cell_outputs as stored
from conftest import run_cli
from sklearn.metrics import roc_auc_score
from test_imagenet import imagenet_samples, make_folder_set

import robench.metrics as M  # noqa: N812
import robench.scoring as S  # noqa: N812
from robench.data import imagenet
from robench.data.base import ImageSource
from robench.features import FeatureSet
from robench.models.heads import LinearHead

SUITE = """
models: [tiny-random]
datasets:
  - cifar10-subset-val
  - {name: val-c, family: generated-c, root: "", options: {base: cifar10-subset-val, stride: 100}}
id_dataset: cifar10-subset-val
model: {batch_size: 64, num_workers: 0}
metrics: {bootstrap: 40}
progress: false
"""


def _source(labels: np.ndarray, n_classes: int, subset: list[int] | None = None,
            groups: dict | None = None) -> ImageSource:
    return ImageSource(name="s", labels=labels, classnames=[f"c{i}" for i in range(n_classes)],
                       manifest_hash="m", loader=None, class_subset=subset, groups=groups,
                       info={"paths": [f"c{y}/{i}.jpg" for i, y in enumerate(labels)]})


def _features(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    f = rng.normal(size=(n, d)).astype(np.float32)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def _head(rng: np.random.Generator, d: int, c: int, scale: float) -> LinearHead:
    w = rng.normal(size=(d, c)).astype(np.float32)
    return LinearHead(w / np.linalg.norm(w, axis=0, keepdims=True), scale,
                      [f"c{i}" for i in range(c)])


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return imagenet_samples(tmp_path_factory.mktemp("imagenet-images"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scoring")
    (tmp / "s.yaml").write_text(SUITE)
    common = (f"cache_dir={tmp / 'cache'}", "device=cpu", "outputs=logits")
    r = run_cli("run", f"suite={tmp / 's.yaml'}", f"results_dir={tmp / 'r'}", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, tmp / "r" / "s" / "tiny-random"


def test_outputs_are_exact_functions_of_the_logits(run):
    _, out = run
    rec = json.loads((out / "cifar10-subset-val.json").read_text())
    z = stored(out / "cifar10-subset-val.json")
    logits = z["logits"].astype(np.float64)
    assert z["logits"].dtype == np.float32 and logits.shape == (500, 10)
    assert rec["outputs"]["logits"] is True and rec["data"]["features_dtype"] == "float32"
    m = logits.max(1)
    np.testing.assert_allclose(z["log_norm"] + m, np.log(np.exp(logits - m[:, None]).sum(1)) + m,
                               rtol=0, atol=1e-6)
    order = np.argsort(-z["logits"], axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(z["topk_index"], order)
    np.testing.assert_array_equal(z["true_logit"], z["logits"][np.arange(500), z["target"]])
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(z["sum_sq_prob"], (p * p).sum(1), rtol=1e-6)
    # sample identity and labels in the dataset's own label space
    assert z["sample_id"][0].decode().endswith(".jpg") and len(set(z["sample_id"])) == 500
    # the record's metrics equal the metrics of the stored logits computed from scratch
    again = M.compute_all(z["logits"], z["target"], n_bootstrap=40, seed=0)
    for k, v in rec["metrics"].items():
        if k != "ood_auroc" and v is not None:
            assert again[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k


def test_rescore_reproduces_every_metric_and_applies_new_settings(run):
    tmp, out = run
    r = run_cli("rescore", "--dir", str(tmp / "r" / "s"), "--verify")
    assert r.returncode == 0, r.stderr
    assert "2 record(s) verified against a full re-scoring" in r.stdout
    assert "0 disagree; nothing was written" in r.stdout
    r = run_cli("rescore", "--dir", str(tmp / "r" / "s"), "--n-bins", "7", "--alpha", "0.1",
                "--out", str(tmp / "re"))
    assert r.returncode == 0, r.stderr
    new = json.loads((tmp / "re" / "tiny-random" / "val-c.json").read_text())
    old = json.loads((out / "val-c.json").read_text())
    assert new["protocol"]["ece_bins"] == 7
    assert new["protocol"]["interval_level"] == pytest.approx(0.9)
    assert new["metrics"]["acc1"] == old["metrics"]["acc1"]
    z = stored(out / "val-c.json")
    for g, gm in new["groups"].items():
        rows = (z["group"] == list(z["group_names"]).index(g)) & z["valid"]
        logits, target = z["logits"][rows], z["target"][rows]
        conf = M.softmax(logits).max(1)
        assert gm["ece"] == pytest.approx(M.ece(conf, logits.argmax(1) == target, 7), abs=1e-6)
        assert gm["acc1_ci_high"] - gm["acc1_ci_low"] < \
            old["groups"][g]["acc1_ci_high"] - old["groups"][g]["acc1_ci_low"]  # 90% < 95%
    assert not (out / "val-c.json").read_text() == (tmp / "re" / "tiny-random" /
                                                    "val-c.json").read_text()


def test_rescore_under_the_other_adaptive_bin_rule(run):
    from robench.cli import main

    tmp, out = run
    old = json.loads((out / "cifar10-subset-val.json").read_text())
    assert old["protocol"]["adaptive_bins"] == "robench"  # the record states its bin rule
    assert old["protocol"]["ece_adaptive"] == M.ADAPTIVE_BINS["robench"]
    assert main(["rescore", "--dir", str(tmp / "r" / "s"), "--adaptive-bins",
                 "torch-uncertainty", "--out", str(tmp / "tu")]) == 0
    new = json.loads((tmp / "tu" / "tiny-random" / "cifar10-subset-val.json").read_text())
    assert new["protocol"]["adaptive_bins"] == "torch-uncertainty"
    assert new["protocol"]["ece_adaptive"] == M.ADAPTIVE_BINS["torch-uncertainty"]
    z = stored(out / "cifar10-subset-val.json")
    conf = M.softmax(z["logits"].astype(np.float64)).max(1)
    correct = z["logits"].argmax(1) == z["target"]
    want = M.adaptive_ece(conf, correct, 15, bins="torch-uncertainty")
    assert new["metrics"]["ece_adaptive"] == pytest.approx(want, abs=1e-9)
    assert want != pytest.approx(old["metrics"]["ece_adaptive"], abs=1e-9)  # 500 = 15 x 33 + 5
    assert {k: v for k, v in new["metrics"].items() if k != "ece_adaptive"} == \
        {k: v for k, v in old["metrics"].items() if k != "ece_adaptive"}
    # the re-scored records hold their rule: --verify re-scores them unchanged, and going back
    # to robench's rule gives the run's numbers again
    assert main(["rescore", "--dir", str(tmp / "tu"), "--verify"]) == 0
    assert main(["rescore", "--dir", str(tmp / "tu"), "--adaptive-bins", "robench",
                 "--out", str(tmp / "back")]) == 0
    back = json.loads((tmp / "back" / "tiny-random" / "cifar10-subset-val.json").read_text())
    assert back["metrics"] == old["metrics"] and back["groups"] == old["groups"]
    from robench.errors import RobenchError
    from robench.rescore import rescore

    with pytest.raises(RobenchError, match="Did you mean 'torch-uncertainty'"):
        rescore(tmp / "tu", adaptive_bins="torch_uncertainty")


def test_rescore_refuses_old_records_with_the_fix(tmp_path):
    folder = tmp_path / "r" / "m"
    folder.mkdir(parents=True)
    (folder / "d.json").write_text(json.dumps({"model": "m", "dataset": "d", "metrics": {},
                                               "protocol": {"method": "zeroshot"}}))
    r = run_cli("rescore", "--dir", str(tmp_path / "r"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "protocol-1 record" in r.stderr and "re-run the suite" in r.stderr


def test_blockwise_scoring_equals_one_block_and_reads_memmaps(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    n, c = 5000, 37
    feats = _features(rng, n)
    np.save(tmp_path / "f.npy", feats)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    head = _head(rng, 16, c, 30.0)
    src = _source(rng.integers(0, c, n), c)
    whole = S.cell_outputs(head, FeatureSet(feats, [], "k", False), src)
    monkeypatch.setattr(S, "_BLOCK_ELEMENTS", 1)  # 1024-row blocks
    assert S.block_rows(c) == 1024
    blocks = S.cell_outputs(head, FeatureSet(mm, [3], "k", True), src)
    for a, b in zip(whole.samples[:-1], blocks.samples[:-1], strict=True):
        np.testing.assert_array_equal(a, b)
    assert not blocks.valid[3] and blocks.valid.sum() == n - 1
    ref = M.compute_all(head.logits(feats)[blocks.valid], src.labels[blocks.valid],
                        n_bootstrap=0)
    got, _ = S.cell_metrics(blocks, None, n_bins=15, n_bootstrap=0, seed=0, alpha=0.05)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-15, nan_ok=True), k


def test_ood_auroc_id_side_is_scored_over_the_same_classes():
    """ImageNet-R-like: the shifted set holds only the sub-list's classes and is scored over
    them; the ID set paired with itself restricted to the sub-list gives exactly 0.5, whereas
    the old pairing (ID confidences over all classes) does not."""
    rng = np.random.default_rng(1)
    n, c, subset = 3000, 50, sorted(rng.choice(50, 10, replace=False).tolist())
    feats = _features(rng, n)
    labels = rng.integers(0, c, n)
    head = _head(rng, 16, c, 100.0)  # saturating, like CLIP at logit scale 100
    id_src = _source(labels, c)
    in_sub = np.isin(labels, subset)
    shifted = _source(labels[in_sub], c, subset=subset)
    id_feats = FeatureSet(feats, [], "id", False)
    out = S.cell_outputs(head, FeatureSet(feats[in_sub], [], "sh", False), shifted)
    out.ood_id_conf, out.ood_id_correct = S.id_confidence(head, id_feats, id_src,
                                                          out.scored_classes)
    m, _ = S.cell_metrics(out, None, n_bins=15, n_bootstrap=0, seed=0, alpha=0.05)
    assert m["ood_auroc"] == 0.5
    # the ID set over the sub-list is this very set: effective robustness's x-axis, id_acc1,
    # is its accuracy over the sub-list's classes (not the ID set's over all 50)
    assert m["id_acc1"] == m["acc1"]
    full = M.metrics_from_outputs(M.sample_outputs(head.logits(feats), labels), n_bootstrap=0)
    assert abs(full["acc1"] - m["id_acc1"]) > 1
    # the old pairing: ID MSP over all 50 classes vs shifted MSP over 10 is biased
    conf_all = M.softmax(head.logits(feats)).max(1)
    assert abs(M.ood_auroc(conf_all, out.samples.conf) - 0.5) > 0.05
    # saturated confidences: equal to scikit-learn on exact float64 confidences
    other = _features(rng, 800)
    sh2 = _source(np.full(800, subset[0]), c, subset=subset)
    out2 = S.cell_outputs(head, FeatureSet(other, [], "o", False), sh2)
    out2.ood_id_conf, _ = S.id_confidence(head, id_feats, id_src, out2.scored_classes)
    m2, _ = S.cell_metrics(out2, None, n_bins=15, n_bootstrap=0, seed=0, alpha=0.05)
    lg = np.concatenate([feats[in_sub], other]).astype(np.float64) @ \
        head.weight[:, subset].astype(np.float64) * 100.0
    p = np.exp(lg - lg.max(1, keepdims=True))
    conf = (p / p.sum(1, keepdims=True)).max(1)
    assert (conf > 1 - 1e-4).mean() > 0.3  # many nearly saturated confidences
    y = np.r_[np.zeros(in_sub.sum()), np.ones(800)]
    assert m2["ood_auroc"] == pytest.approx(roc_auc_score(y, -conf), abs=1e-9)


def test_ood_no_shift_control_end_to_end(tmp_path, samples, monkeypatch):
    """The ID set (ImageNet layout) against the same images laid out as ImageNet-R and scored
    over R's 200 classes: ood_auroc is exactly 0.5 (it was 0.34 with the 1000-way ID side)."""
    import robench.models.zeroshot as zs
    from robench.cli import main

    def fake_embeddings(backbone, classnames, templates, cache_dir, progress=True):
        w = np.random.default_rng(0).normal(size=(32, len(classnames))).astype(np.float32)
        return w / np.linalg.norm(w, axis=0, keepdims=True)

    monkeypatch.setattr(zs, "class_embeddings", fake_embeddings)
    make_folder_set(tmp_path / "in", samples)
    make_folder_set(tmp_path / "r", samples, set(imagenet.subset_wnids("imagenet-r")), ".jpg")
    suite = tmp_path / "s.yaml"
    suite.write_text(f"""
models: [tiny-random]
datasets:
  - {{name: in, family: imagenet-folder, root: {tmp_path / 'in'}, templates: imagenet}}
  - {{name: same-as-r, family: imagenet-folder, root: {tmp_path / 'r'}, templates: imagenet,
     options: {{subset: imagenet-r}}}}
id_dataset: in
model: {{batch_size: 128, num_workers: 0}}
metrics: {{bootstrap: 0}}
progress: false
""")
    rc = main(["run", f"suite={suite}", f"cache_dir={tmp_path / 'c'}", "device=cpu",
               f"results_dir={tmp_path / 'res'}"])
    assert rc == 0
    rec = json.loads((tmp_path / "res" / "s" / "tiny-random" / "same-as-r.json").read_text())
    assert rec["metrics"]["ood_auroc"] == 0.5
    assert rec["protocol"]["n_classes_scored"] == 200
    z = stored(tmp_path / "res" / "s" / "tiny-random" / "same-as-r.json")
    assert len(z["ood_id_conf"]) == 200  # ID samples of the 200 classes only
    assert set(z["label"].tolist()) == set(imagenet.subset_indices("imagenet-r"))  # 1k labels
