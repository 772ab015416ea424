"""A model's declared preprocessing (robench.preprocess): a CIFAR network scored by robench with
its ``preprocess:`` block matches RobustBench's evaluation recipe group by group, and the
default (ImageNet) preprocessing gives today's other number; open_clip backbones take a block
too; bad blocks are named errors when the suite loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image

import robench
from robench.errors import RobenchError
from robench.io import write_json
from robench.preprocess import INTERPOLATIONS, Preprocess, describe_transform
from robench.registry import ModelSpec, resolve_model
from robench.scoring import CellOutputs

SUBSET = Path(robench.__file__).parent / "assets" / "cifar10-subset"
CORRUPTIONS = ("gaussian_noise", "contrast")
RAW = {"size": 32, "crop": None, "mean": [0, 0, 0], "std": [1, 1, 1]}  # [0, 1] pixels as they are
NONE = {"size": None, "crop": None, "mean": None, "std": None}  # the same, with no steps at all
NETS = {"torchvision:shufflenet_v2_x0_5": RAW, "timm:test_resnet": NONE}


def shipped(split: str, per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Real CIFAR-10 test images shipped with robench, (n, 32, 32, 3) uint8 and labels."""
    xs, ys = [], []
    for label, folder in enumerate(sorted(p for p in (SUBSET / split).iterdir() if p.is_dir())):
        for f in sorted(folder.iterdir())[:per_class]:
            xs.append(np.asarray(Image.open(f).convert("RGB")))
            ys.append(label)
    return np.stack(xs), np.array(ys)


def train(arch: str, x: np.ndarray, y: np.ndarray) -> torch.nn.Module:
    """A seeded 10-class network trained for two epochs of Adam on raw 32x32 pixels in [0, 1]
    (RobustBench's CIFAR input), its BatchNorm statistics then re-estimated on the training
    images: after a few steps the running averages are far from the final weights'."""
    import timm
    import torchvision

    lib, name = arch.split(":")
    torch.manual_seed(0)
    net = timm.create_model(name, num_classes=10) if lib == "timm" else \
        torchvision.models.get_model(name, weights=None, num_classes=10)
    xs, ys = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(y)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(2):
        for b in torch.randperm(len(xs), generator=order).split(100):
            loss = torch.nn.functional.cross_entropy(net(xs[b]), ys[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # a plain average over the batches below
        for b in xs.split(250):
            net(b)
    return net.eval()


def cifar_c(root: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """CIFAR-10-C's layout: ``<corruption>.npy`` uint8 (5N, 32, 32, 3), severity s in rows
    [(s-1)N, sN), plus ``labels.npy``; two corruptions with the formulas and constants of
    Hendrycks & Dietterich's make_cifar_c.py."""
    root.mkdir(parents=True)
    f = x.astype(np.float64) / 255
    rng = np.random.default_rng(0)
    means = f.mean(axis=(1, 2), keepdims=True)
    severities = {
        "gaussian_noise": [f + rng.normal(size=f.shape, scale=c)
                           for c in (0.04, 0.06, 0.08, 0.09, 0.10)],
        "contrast": [(f - means) * c + means for c in (0.75, 0.5, 0.4, 0.3, 0.15)],
    }
    for name, levels in severities.items():
        np.save(root / f"{name}.npy", np.uint8(np.clip(np.concatenate(levels), 0, 1) * 255))
    np.save(root / "labels.npy", np.tile(y, 5).astype(np.int64))
    write_json(root / "robench_c.json", {"corruptions": list(CORRUPTIONS)})
    return root


def group_accuracies(root: Path, predict) -> dict[str, float]:
    """Accuracy (%) of each (corruption, severity) group, RobustBench's ``clean_accuracy``:
    argmax over the logits of batches of 100 rows, in file order."""
    y = torch.from_numpy(np.load(root / "labels.npy"))
    n = len(y) // 5
    out = {}
    for c in CORRUPTIONS:
        rows = np.load(root / f"{c}.npy")
        correct = torch.cat([predict(rows[i:i + 100]).argmax(1) == y[i:i + 100]
                             for i in range(0, len(rows), 100)])
        for s in range(1, 6):
            out[f"{c}/{s}"] = 100 * int(correct[(s - 1) * n:s * n].sum()) / n
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small batches of small networks on a shared machine: a second torch thread mostly
    waits for the first (3-5x slower here under load); every number below is computed in
    this one setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(NETS))
def cifar_net(request, tmp_path_factory) -> tuple[str, torch.nn.Module, Path, Path]:
    """(arch, trained network, its checkpoint file, a CIFAR-10-C fixture of 20 other images)."""
    from safetensors.torch import save_file

    arch = request.param
    d = tmp_path_factory.mktemp(arch.replace(":", "-"))
    net = train(arch, *shipped("probe"))
    ckpt = d / ("net.safetensors" if arch.startswith("timm") else "net.pth")
    if arch.startswith("timm"):
        save_file(net.state_dict(), str(ckpt))
    else:
        torch.save(net.state_dict(), ckpt)
    return arch, net, ckpt, cifar_c(d / "CIFAR-10-C", *shipped("test", per_class=2))


def score(tmp: Path, arch: str, ckpt: Path, root: Path, preprocess: dict | None) -> dict:
    """robench's record of the network on the fixture (model name 'net' either way)."""
    model = {"name": "net", "arch": arch, "pretrained": str(ckpt), "method": "classifier"}
    if preprocess is not None:
        model["preprocess"] = preprocess
    robench.evaluate(model=model, datasets=[{"name": "c10c", "family": "cifar-c",
                                             "root": str(root)}],
                     device="cpu", results_dir=str(tmp / "runs"), cache_dir=str(tmp / "cache"),
                     metrics={"bootstrap": 0},
                     overrides=["model.batch_size=100", "model.num_workers=0", "progress=false"])
    return json.loads((tmp / "runs" / "evaluate" / "net" / "c10c.json").read_text())


def test_a_cifar_network_scores_as_robustbench_with_its_declared_preprocessing(cifar_net,
                                                                              tmp_path):
    """(a) With its block, every group's accuracy is RobustBench's recipe's exactly; (b) with
    the library's default (ImageNet-style resize, crop, normalisation) it is the other number
    robench gave before blocks existed, and the block's run reused neither its features nor
    its record."""
    arch, net, ckpt, root = cifar_net
    lib, name = arch.split(":")

    def raw(rows: np.ndarray) -> torch.Tensor:  # load_cifar10c: float32 / 255, NCHW
        with torch.no_grad():
            return net(torch.from_numpy(rows).permute(0, 3, 1, 2).float() / 255)

    if lib == "timm":
        from timm.data import create_transform, resolve_data_config

        default = create_transform(**resolve_data_config(model=net), is_training=False)
    else:
        import torchvision

        default = torchvision.models.get_model_weights(name).DEFAULT.transforms()

    def library(rows: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return net(torch.stack([default(Image.fromarray(r)) for r in rows]))

    declared = score(tmp_path, arch, ckpt, root, NETS[arch])
    want = group_accuracies(root, raw)
    assert {g: m["acc1"] for g, m in declared["groups"].items()} == pytest.approx(want, abs=1e-9)
    assert declared["metrics"]["acc1"] == pytest.approx(np.mean(list(want.values())), abs=1e-9)
    assert declared["provenance"]["preprocess"] == "declared: " + Preprocess(
        **NETS[arch]).describe()

    today = score(tmp_path, arch, ckpt, root, None)  # same model name, block removed
    other = group_accuracies(root, library)
    assert {g: m["acc1"] for g, m in today["groups"].items()} == pytest.approx(other, abs=1e-9)
    source = "timm pretrained config" if lib == "timm" else "torchvision"
    assert today["provenance"]["preprocess"].startswith(source)
    assert today["cell_key"] != declared["cell_key"]
    assert today["data"]["feature_key"] != declared["data"]["feature_key"]
    # a run that ignored the block would have given these other numbers, so it could not have
    # matched RobustBench's above; the network learnt on raw 32x32 pixels, and the library's
    # resize-and-normalise pipeline costs it accuracy
    print(f"\n{arch}: declared {declared['metrics']['acc1']:.2f}% vs default "
          f"{today['metrics']['acc1']:.2f}% (chance 10%)")
    assert want != other
    assert declared["metrics"]["acc1"] > today["metrics"]["acc1"]


# -- open_clip backbones -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """20 real CIFAR-10 test images (32x32), 2 per class, in the folder layout."""
    root = tmp_path_factory.mktemp("folder")
    for cls in sorted(p.name for p in (SUBSET / "test").iterdir()):
        (root / cls).mkdir()
        for f in sorted((SUBSET / "test" / cls).iterdir())[:2]:
            shutil.copy(f, root / cls / f.name)
    return root


def test_an_open_clip_model_takes_a_declared_block(tiny_checkpoint, images, tmp_path):
    """The block replaces the tag's preprocessing (here: another mean / std, as for a
    checkpoint trained with them): the cached features are the network's on the declared
    pixels, and the record says so."""
    import open_clip

    block = {"size": 32, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3,
             "interpolation": "bicubic"}
    records = {}
    for name, pre in (("tag", None), ("declared", block)):
        model = {"name": name, "arch": TINY, "pretrained": str(tiny_checkpoint), **(
            {"preprocess": pre} if pre else {})}
        robench.evaluate(model=model, datasets=[{"name": "f", "family": "folder",
                                                 "root": str(images)}],
                         device="cpu", results_dir=str(tmp_path / "runs"),
                         cache_dir=str(tmp_path / "cache"), metrics={"bootstrap": 0},
                         overrides=["model.num_workers=0", "progress=false"])
        records[name] = json.loads((tmp_path / "runs" / "evaluate" / name / "f.json")
                                   .read_text())
    rec = records["declared"]
    assert rec["provenance"]["preprocess"] == \
        "declared: resize 32 bicubic, crop 32, mean [0.5,0.5,0.5] std [0.25,0.25,0.25]"
    assert records["tag"]["provenance"]["preprocess"].startswith("Compose(")  # as before
    assert rec["data"]["feature_key"] != records["tag"]["data"]["feature_key"]

    net = open_clip.create_model(TINY)
    net.load_state_dict(torch.load(tiny_checkpoint, weights_only=True))
    net.eval()
    ids = CellOutputs.load(tmp_path / "runs" / "evaluate" / "declared" / "f.npz").sample_ids
    # the images are 32x32 already, so resize and crop to 32 leave them as they are
    x = torch.stack([torch.from_numpy(np.array(Image.open(images / i.decode()).convert("RGB")))
                     for i in ids]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        want = torch.nn.functional.normalize(net.encode_image((x - 0.5) / 0.25), dim=-1)
    got = np.load(tmp_path / "cache" / "features" / f"{rec['data']['feature_key']}.npy")
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    tag = np.load(tmp_path / "cache" / "features" /
                  f"{records['tag']['data']['feature_key']}.npy")
    assert np.abs(tag - got).max() > 1e-2  # the tag's mean / std give other features


def test_an_open_clip_block_must_fit_the_network_input(tiny_checkpoint):
    from robench.models.backbone import load_backbone

    with pytest.raises(RobenchError, match="makes 48x48 images but the network takes 32x32"):
        load_backbone(TINY, str(tiny_checkpoint), device="cpu",
                      preprocess=Preprocess(size=48, crop=48))


def test_lp_clip_strong_views_follow_the_declared_normalisation(tiny_checkpoint):
    """LP-CLIP's strong views end as its weak view does: with the block's Normalize, or with
    none when the block normalises nothing (pixels in [0, 1])."""
    from torchvision import transforms as T

    from robench.models import lp_clip
    from robench.models.backbone import load_backbone

    for block, last in ((RAW, T.Normalize), (NONE, T.ToTensor)):
        backbone = load_backbone(TINY, str(tiny_checkpoint), device="cpu",
                                 preprocess=Preprocess(**block))
        steps = lp_clip.strong_transform(backbone).transforms
        assert isinstance(steps[-1], last)
        if last is T.Normalize:
            assert steps[-1] is backbone.preprocess.transforms[-1]


@pytest.mark.parametrize("method, options", [
    ("finetune", {"train_on": "cifar10-subset-probe"}),
    ("wise-ft", {"finetuned": "ft"}),
    ("temperature-scaling", {"calibrate_on": "cifar10-subset-val", "base": "car-ft",
                             "base_options": {"train_on": "cifar10-subset-probe"}}),
])
def test_methods_that_build_their_own_backbone_refuse_a_block(method, options):
    with pytest.raises(RobenchError, match=f"method '{method}'.*trains or loads its own "
                                           "backbone"):
        resolve_model({"name": "m", "arch": TINY, "method": method, "options": options,
                       "preprocess": RAW})
    # the same model without the block is fine, and so is a head on the frozen backbone
    resolve_model({"name": "m", "arch": TINY, "method": method, "options": options})
    resolve_model({"name": "m", "arch": TINY, "method": "temperature-scaling", "preprocess": RAW,
                   "options": {"calibrate_on": "cifar10-subset-val", "base": "linear-probe",
                               "base_options": {"train_on": "cifar10-subset-probe",
                                                "val_on": "cifar10-subset-val"}}})


# -- the block as data ---------------------------------------------------------------------------
@pytest.mark.parametrize("block, phrase", [
    ({"sise": 32}, "unknown preprocess key 'sise'. Did you mean 'size'?"),
    ({"size": 0}, "preprocess.size=0 must be a positive integer"),
    ({"crop": -3}, "preprocess.crop=-3 must be a positive integer"),
    ({"size": 32.5}, "preprocess.size=32.5 must be a positive integer"),
    ({"size": "abc"}, "preprocess.size='abc' must be a positive integer"),
    ({"size": True}, "preprocess.size=True must be a positive integer"),
    ({"mean": [0, 0, 0], "std": [1, 0, 1]}, "must be positive in every channel"),
    ({"mean": [0, 0], "std": [1, 1]}, "preprocess.mean=[0, 0] must be a list of 3 numbers"),
    ({"mean": [0, 0, 0], "std": "1"}, "preprocess.std='1' must be a list of 3 numbers"),
    ({"mean": [0, 0, 0]}, "preprocess.mean is given but preprocess.std is null"),
    ({"size": 32, "interpolation": "bilinar"}, "Did you mean 'bilinear'?"),
    ({"size": 32, "crop": 48}, "crop=48 is larger than preprocess.size=32"),
    ("imagenet", "preprocess must be a mapping"),
])
def test_a_bad_block_is_a_named_error_when_the_suite_loads(block, phrase):
    with pytest.raises(RobenchError) as e:
        resolve_model({"name": "cifar-net", "arch": "torchvision:resnet18",
                       "method": "classifier", "preprocess": block})
    assert phrase in e.value.problem and "model 'cifar-net'" in e.value.problem
    assert e.value.fix


def test_the_block_is_typed_in_every_form():
    """A suite's mapping, a ModelSpec given a mapping or a Preprocess, and a registered model
    tweaked with ``base:`` all give the same frozen Preprocess (lists become float tuples)."""
    want = Preprocess(size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    _, spec = resolve_model({"name": "n", "arch": "torchvision:resnet18", "preprocess": RAW})
    assert spec.preprocess == want and isinstance(spec.preprocess.mean, tuple)
    assert ModelSpec("torchvision:resnet18", preprocess=RAW).preprocess == want
    assert ModelSpec("torchvision:resnet18", preprocess=want).preprocess is want
    _, based = resolve_model({"name": "b", "base": "tiny-random", "preprocess": {"size": 32}})
    assert based.preprocess == Preprocess(size=32) and based.arch == "robench-tiny-vit"
    assert resolve_model({"name": "d", "arch": TINY})[1].preprocess is None
    assert hash(want) == hash(Preprocess(**RAW))  # a key of the runner's backbone groups
    assert robench.Preprocess is Preprocess and "Preprocess" in robench.__all__

    # an inline declaration on the command line, through the config's override parser
    from omegaconf import OmegaConf

    from robench.config import build_config

    cfg = build_config({"datasets": ["cifar10"]}, [
        "models=[{name: c, arch: 'torchvision:resnet18', method: classifier, "
        "preprocess: {size: 32, crop: null, mean: [0, 0, 0], std: [1, 1, 1]}}]"],
        default_name="s")
    assert resolve_model(OmegaConf.to_container(cfg.models[0]))[1].preprocess == want


def test_interpolations_are_torchvisions():
    from torchvision.transforms import InterpolationMode

    assert sorted(INTERPOLATIONS) == sorted(m.value for m in InterpolationMode)
    for mode in INTERPOLATIONS:  # each builds and says which it is
        assert f"resize 8 {mode}," in Preprocess(size=8, interpolation=mode).describe()


def test_descriptions_are_read_off_the_transform():
    import torchvision
    from timm.data import create_transform
    from torchvision import transforms as T

    assert Preprocess(**RAW).describe() == "resize 32 bilinear, no crop, mean [0,0,0] std [1,1,1]"
    assert Preprocess(**NONE).describe() == "no resize, no crop, no normalisation"
    assert Preprocess(size=256, crop=224, mean=[0.48145466, 0.4578275, 0.40821073],
                      std=[0.5, 0.5, 0.5], interpolation="bicubic").describe() == \
        "resize 256 bicubic, crop 224, mean [0.48145466,0.4578275,0.40821073] std [0.5,0.5,0.5]"
    preset = torchvision.models.get_model_weights("resnet50").DEFAULT.transforms()
    assert describe_transform(preset) == \
        "resize 232 bilinear, crop 224, mean [0.485,0.456,0.406] std [0.229,0.224,0.225]"
    timm_eval = create_transform(input_size=(3, 160, 160), crop_pct=0.95,
                                 interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    assert describe_transform(timm_eval) == \
        "resize 168 bicubic, crop 160, mean [0.5,0.5,0.5] std [0.5,0.5,0.5]"
    # a step it does not name is written out, so the description still says what it does
    odd = describe_transform(T.Compose([T.Grayscale(3), T.ToTensor()]))
    assert odd == "no resize, no crop, Grayscale(num_output_channels=3), no normalisation"
    assert describe_transform(T.Compose([T.Resize((32, 48)), T.ToTensor()])).startswith(
        "resize 32x48 bilinear")  # an exact (h, w), not a shorter side


def test_the_readme_example_declares_robustbench_input():
    """The README's CIFAR example loads as a block of no steps but ToTensor (RobustBench's
    [0, 1] pixels), and the description it quotes is what such a block records."""
    import re

    import yaml
    from conftest import REPO

    text = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "preprocess:" in b)
    _, spec = resolve_model(yaml.safe_load(block)["models"][0])
    assert spec.preprocess == Preprocess() and spec.method == "classifier"
    assert f"`declared: {Preprocess(**RAW).describe()}`" in " ".join(text.split())
