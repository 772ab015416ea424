"""Standard classifiers as models (robench.models.zoo): tiny random timm and torchvision networks
saved to local files, scored by the ``classifier`` method through the run's features -> cells ->
records path, with the network's own logits in the per-sample outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import robench
from robench.cli import main
from robench.errors import RobenchError
from robench.models import zoo
from robench.scoring import CellOutputs

ASSETS = Path(robench.__file__).parent / "assets" / "cifar10-subset" / "test"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 real CIFAR-10 test images, 2 per class, in the folder layout."""
    root = tmp_path_factory.mktemp("tiny-folder")
    for cls in sorted(p.name for p in ASSETS.iterdir()):
        (root / cls).mkdir()
        for f in sorted((ASSETS / cls).iterdir())[:2]:
            shutil.copy(f, root / cls / f.name)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import timm
    import torchvision
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    tm = timm.create_model("test_resnet", num_classes=10)
    with torch.no_grad():  # a non-trivial classifier, so the logits tell models apart
        tm.fc.weight.normal_(0, 0.5)
    save_file(tm.state_dict(), str(d / "test_resnet.safetensors"))
    tv = torchvision.models.get_model("squeezenet1_1", weights=None, num_classes=10)
    torch.save(tv.state_dict(), d / "squeezenet.pth")
    return {"timm": d / "test_resnet.safetensors", "torchvision": d / "squeezenet.pth"}


def run(tmp: Path, images: Path, arch: str, pretrained: str | None, name: str = "net") -> Path:
    robench.evaluate(model={"name": name, "arch": arch, "pretrained": pretrained,
                            "method": "classifier"},
                     datasets=[{"name": "tiny-folder", "family": "folder", "root": str(images)}],
                     device="cpu", results_dir=str(tmp / "runs"), cache_dir=str(tmp / "cache"),
                     metrics={"bootstrap": 0},
                     overrides=["model.batch_size=8", "model.num_workers=0"])
    return tmp / "runs" / "evaluate" / name / "tiny-folder.npz"


def own_logits(arch: str, pretrained: str, images: Path, ids: np.ndarray) -> np.ndarray:
    net, preprocess = zoo.build(arch, pretrained)
    batch = torch.stack([preprocess(Image.open(images / i.decode()).convert("RGB"))
                         for i in ids])
    with torch.no_grad():
        return net(batch).numpy()


@pytest.mark.parametrize("lib", ["timm", "torchvision"])
def test_a_classifier_is_scored_on_its_own_logits(lib: str, weights: dict, images: Path,
                                                  tmp_path: Path) -> None:
    arch = {"timm": "timm:test_resnet", "torchvision": "torchvision:squeezenet1_1"}[lib]
    npz = run(tmp_path, images, arch, str(weights[lib]))
    out = CellOutputs.load(npz)
    rec = robench.load_results(str(tmp_path / "runs" / "evaluate")).iloc[0]
    assert rec["method"] == "classifier" and rec["n"] == 20
    want = own_logits(arch, str(weights[lib]), images, out.sample_ids)
    # the cached float16 [hi, lo] pair gives the float32 logits back to ~2^-22 relative
    np.testing.assert_allclose(out.samples.topk_logit[:, 0], want.max(1), rtol=1e-5, atol=1e-5)
    assert np.array_equal(out.samples.topk_index[:, 0], want.argmax(1))


def test_timm_reads_the_file_through_its_pretrained_cfg_overlay(weights: dict,
                                                                monkeypatch) -> None:
    """timm's own loader is used with the overlay's file; the loaded weights are the file's."""
    import timm
    from safetensors.torch import load_file

    seen = {}
    real = timm.create_model

    def spy(name, **kw):
        seen.update(kw)
        return real(name, **kw)

    monkeypatch.setattr(timm, "create_model", spy)
    net, preprocess = zoo.build("timm:test_resnet", str(weights["timm"]))
    assert seen["pretrained"] is True and seen["num_classes"] == 10
    assert seen["pretrained_cfg_overlay"]["file"] == str(weights["timm"].resolve())
    saved = load_file(str(weights["timm"]))
    for k, v in net.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert preprocess(Image.new("RGB", (300, 300))).shape[0] == 3


def test_random_weights_are_seeded() -> None:
    a, _ = zoo.build("timm:test_vit", None, seed=3)
    b, _ = zoo.build("timm:test_vit", None, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                  b.state_dict().values(), strict=True))


def test_nothing_is_downloaded_and_bad_names_say_so(weights: dict, tmp_path: Path) -> None:
    with pytest.raises(RobenchError, match="not a local file; robench never downloads"):
        zoo.check_loadable("timm:test_resnet", "a1_in1k")
    with pytest.raises(RobenchError, match="unknown timm model 'resnet5O'"):
        zoo.check_loadable("timm:resnet5O", None)
    with pytest.raises(RobenchError, match="unknown timm model"):
        zoo.check_loadable("timm:hf-hub:timm/resnet18.a1_in1k", None)
    with pytest.raises(RobenchError, match="unknown torchvision model"):
        zoo.check_loadable("torchvision:resnet", None)
    with pytest.raises(RobenchError, match="does not fit torchvision's resnet18"):
        zoo.build("torchvision:resnet18", str(weights["torchvision"]))
    with pytest.raises(RobenchError, match="timm could not load test_vit"):
        zoo.build("timm:test_vit", str(weights["timm"]))


def test_cli_refuses_a_missing_weights_file_before_any_data(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    code = main(["run", "suite=smoke", "models=[{name: r, arch: 'timm:test_resnet', pretrained: "
                 f"{tmp_path}/missing.safetensors, method: classifier}}]",
                 f"results_dir={tmp_path}/runs", f"cache_dir={tmp_path}/cache"])
    assert code == 2
    err = capsys.readouterr().err
    assert "not a local file" in err and "fix:" in err and "Traceback" not in err
