"""Suites, overrides and the errors for bad names / keys / values."""

from __future__ import annotations

import pytest

from robench.config import load_suite
from robench.errors import RobenchError, closest_first
from robench.runner import Runner


def test_suite_loads_with_overrides():
    cfg = load_suite("smoke", ["datasets=[cifar10]", "model.batch_size=64", "device=cpu",
                               "data.cifar10.root=/x/y"])
    assert list(cfg.datasets) == ["cifar10"]
    assert cfg.model.batch_size == 64
    assert cfg.device == "cpu"
    assert cfg.data.cifar10.root == "/x/y"
    assert cfg.name == "smoke"


def test_suite_from_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("models: [tiny-random]\ndatasets: [cifar10]\nseed: 3\n")
    cfg = load_suite(str(p), ["seed=4"])
    assert cfg.name == "mine" and cfg.seed == 4


def test_unknown_suite_lists_valid_names_closest_first():
    with pytest.raises(RobenchError) as e:
        load_suite("smok")
    assert "unknown suite 'smok'" in str(e.value)
    assert "Did you mean 'smoke'" in str(e.value)


def test_unknown_key_names_closest_valid_key():
    with pytest.raises(RobenchError) as e:
        load_suite("smoke", ["model.batchsize=3"])
    msg = str(e.value)
    assert "unknown config key 'model.batchsize'" in msg
    assert "Did you mean 'model.batch_size'" in msg


def test_unknown_top_level_key_in_suite_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("models: [tiny-random]\ndatasets: [cifar10]\ndevise: cpu\n")
    with pytest.raises(RobenchError, match="Did you mean 'device'"):
        load_suite(str(p))


@pytest.mark.parametrize("override", ["model.batch_size", "=3"])
def test_override_without_equals(override):
    with pytest.raises(RobenchError, match="expected key=value"):
        load_suite("smoke", [override])


def test_bad_value_type():
    with pytest.raises(RobenchError, match="invalid value"):
        load_suite("smoke", ["model.batch_size=lots"])


def test_bad_precision():
    with pytest.raises(RobenchError, match="precision"):
        load_suite("smoke", ["model.precision=fp8"])


def test_env_data_root(monkeypatch):
    monkeypatch.setenv("ROBENCH_DATA", "/datasets")
    assert load_suite("smoke").data_root == "/datasets"
    assert load_suite("smoke", ["data_root=/other"]).data_root == "/other"


def test_unknown_model_and_dataset_list_valid_names():
    with pytest.raises(RobenchError) as e:
        Runner(load_suite("smoke", ["models=[tiny-randon]"]))
    assert "Did you mean 'tiny-random'" in str(e.value)
    with pytest.raises(RobenchError) as e:
        Runner(load_suite("smoke", ["datasets=[cifar-10]"]))
    assert "Did you mean 'cifar10'" in str(e.value)


def test_inline_model_declaration_and_bad_field():
    cfg = load_suite("smoke", ["models=[{name: mine, base: tiny-random}]"])
    assert Runner(cfg).models["mine"].arch == "robench-tiny-vit"
    with pytest.raises(RobenchError, match="Did you mean 'arch'"):
        Runner(load_suite("smoke", ["models=[{name: mine, archh: x}]"]))


def test_closest_first_orders_by_similarity():
    assert closest_first("imagenet-r", ["imagenet-a", "imagenet-r2", "cifar10"])[0] == "imagenet-r2"


def test_load_suite_records_which_keys_the_command_line_set(tmp_path):
    cfg = load_suite("smoke", ["datasets=[cifar10]", "data.cifar10.root=/x"])
    assert cfg.meta.overridden == ["data", "datasets"]
    assert cfg.meta.path.endswith("smoke.yaml")
    p = tmp_path / "meta.yaml"
    p.write_text("models: [tiny-random]\ndatasets: [cifar10]\nmeta: {overridden: [datasets]}\n")
    with pytest.raises(RobenchError, match="filled in by robench"):
        load_suite(str(p))
    with pytest.raises(RobenchError, match="filled in by robench"):
        load_suite("smoke", ["meta.path=/x"])


def test_id_dataset_pairing_kept_dropped_or_refused(tmp_path):
    p = tmp_path / "paired.yaml"
    p.write_text("models: [tiny-random]\ndatasets: [cifar10, cifar10-subset-val]\n"
                 "id_dataset: cifar10\n")
    assert Runner(load_suite(str(p))).cfg.id_dataset == "cifar10"
    kept = Runner(load_suite(str(p), ["datasets=[cifar10-subset-val,cifar10]"]))
    assert kept.cfg.id_dataset == "cifar10"
    dropped = Runner(load_suite(str(p), ["datasets=[cifar10-subset-val]"]))
    assert dropped.cfg.id_dataset is None
    assert Runner(load_suite(str(p), ["datasets=[cifar10-subset-val]", "id_dataset=null"])
                  ).cfg.id_dataset is None
    with pytest.raises(RobenchError, match="given on the command line"):
        Runner(load_suite(str(p), ["datasets=[cifar10-subset-val]", "id_dataset=cifar10"]))
    with pytest.raises(RobenchError, match="given on the command line"):
        Runner(load_suite(str(p), ["id_dataset=cifar100"]))
    p.write_text("models: [tiny-random]\ndatasets: [cifar10]\nid_dataset: cifar100\n")
    with pytest.raises(RobenchError, match="not one of its datasets"):
        Runner(load_suite(str(p)))


def test_adaptive_bin_rule_is_a_checked_metrics_key():
    from robench.config import config_help

    assert load_suite("smoke").metrics.adaptive_bins == "robench"  # numbers do not move
    cfg = load_suite("smoke", ["metrics.adaptive_bins=torch-uncertainty"])
    assert cfg.metrics.adaptive_bins == "torch-uncertainty"
    with pytest.raises(RobenchError) as e:
        load_suite("smoke", ["metrics.adaptive_bins=torch_uncertainty"])
    assert "Did you mean 'torch-uncertainty'" in str(e.value)
    assert "metrics.adaptive_bins=robench" in e.value.fix
    assert "metrics.adaptive_bins=robench" in config_help()  # robench run --help lists it
