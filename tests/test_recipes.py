"""Every recipe loads and validates, says what its study says, and is documented."""
from __future__ import annotations


import pytest

from conftest import REPO
from tumorseg_dist.config import parse, to_dict

RECIPES = REPO / "recipes"
NAMES = ["pet-unet-r34-640", "lung-unet-256", "tif-unet-128", "unetplusplus-r34-512",
         "coco-unet-r34", "synthetic-quickstart", "busi-3class-unetpp-r34-512", "coco-categories-unet-r34",
         "msd-style-nifti"]

# What the issue and the studies' write-ups fix for each recipe (section.key -> value).
STUDY = {
    "pet-unet-r34-640": {"model.arch": "unet", "model.encoder": "resnet34", "model.encoder_weights": "imagenet",
                         "data.size": 640, "data.in_channels": 3, "loss.loss": "dice_bce"},
    "lung-unet-256": {"model.arch": "unet-classic", "data.size": 256, "data.in_channels": 1,
                      "loss.loss": "bce", "augment.augment": "none", "train.monitor": "val_loss"},
    "tif-unet-128": {"model.arch": "unet-classic", "data.size": 128, "data.in_channels": 1,
                     "loss.loss": "bce", "optim.optimizer": "adam", "optim.scheduler": "plateau",
                     "train.epochs": 50, "train.batch_size": 8, "augment.augment": "none"},
    "unetplusplus-r34-512": {"model.arch": "unetplusplus", "model.encoder": "resnet34",
                             "model.encoder_weights": "imagenet", "data.size": 512, "data.in_channels": 3,
                             "loss.loss": "dice_bce"},
    "coco-unet-r34": {"model.arch": "unet", "model.encoder": "resnet34", "model.encoder_weights": "imagenet",
                      "loss.loss": "bce", "optim.optimizer": "adam", "train.monitor": "val_loss"},
    "synthetic-quickstart": {"model.arch": "unet", "data.in_channels": 1},
    # the K-class variants (issue 17): their studies' settings, their classes from the manifest
    "busi-3class-unetpp-r34-512": {"model.arch": "unetplusplus", "model.encoder": "resnet34", "data.size": 512,
                                   "data.in_channels": 3, "loss.loss": "dice_bce",
                                   "data.path": "shards/busi-3class"},
    "coco-categories-unet-r34": {"model.arch": "unet", "model.encoder": "resnet34", "loss.loss": "bce",
                                 "optim.optimizer": "adam", "train.monitor": "val_loss",
                                 "data.path": "shards/brain-coco-categories"},
    # issue 16: CT volumes as 16-bit slices, trained from scratch (no 1-channel ImageNet weights)
    "msd-style-nifti": {"data.path": "shards/msd-liver", "data.in_channels": 1, "model.encoder_weights": "none",
                        "loss.loss": "dice_bce"},
}


def test_the_recipe_folder_holds_exactly_the_documented_recipes():
    assert sorted(p.stem for p in RECIPES.glob("*.toml")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_loads_validates_and_matches_its_study(name):
    cfg, _ = parse(["--config", str(RECIPES / f"{name}.toml")])
    flat = {f"{s}.{k}": v for s, t in to_dict(cfg).items() for k, v in t.items()}
    for key, want in STUDY[name].items():
        assert flat[key] == want, f"{name}: {key} = {flat[key]!r}, the study says {want!r}"


@pytest.mark.parametrize("name", NAMES)
def test_recipe_takes_the_scaled_down_overrides_of_the_real_data_check(name):
    cfg, _ = parse(["--config", str(RECIPES / f"{name}.toml"), "--size", "128", "--epochs", "2",
                    "--encoder", "resnet18", "--encoder-weights", "none", "--data", "shards/x"])
    assert (cfg.data.size, cfg.train.epochs, cfg.model.encoder_weights) == (128, 2, "none")


def test_train_help_with_a_recipe_shows_its_values(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--config", str(RECIPES / "tif-unet-128.toml"), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "unet-classic" in out and "plateau" in out


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_synthetic_quickstart_is_the_built_in_default(device):
    plain, preset = parse(["--device", device])
    recipe, preset2 = parse(["--config", str(RECIPES / "synthetic-quickstart.toml"), "--device", device])
    assert preset == preset2 == f"synthetic-{device}"
    assert to_dict(recipe) == to_dict(plain)


def test_docs_cover_every_recipe():
    doc = (REPO / "docs" / "recipes.md").read_text()
    for name in NAMES:
        assert f"recipes/{name}.toml" in doc, name
