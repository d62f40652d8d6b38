"""Model specs, labels and preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.engine.adapters.timm_models import class_labels
from service.engine.engine import Engine
from service.models import ModelSpec, Preprocess
from tests import reference as ref
from tests.conftest import make_model, smooth_image


@pytest.mark.parametrize("text, alias, spec", [
    ("deit_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_patch16_224"),
    ("hf-hub:timm/vit_small.augreg", "vit_small.augreg", "hf-hub:timm/vit_small.augreg"),
    ("local-dir:/srv/models/shapes-vit/", "shapes-vit", "local-dir:/srv/models/shapes-vit/"),
    ("fast=local-dir:/m/x", "fast", "local-dir:/m/x"),
])
def test_spec_parsing_and_default_alias(text, alias, spec):
    assert ModelSpec.parse(text) == ModelSpec(alias=alias, spec=spec)


def test_empty_spec_is_refused():
    with pytest.raises(ValueError):
        ModelSpec.parse("name=")


def test_preprocess_squashes_the_whole_image_with_the_models_statistics(models):
    m = models["deit_tiny_patch16_224"]
    pre = Preprocess.from_model(m)
    assert pre.size == (224, 224) and pre.interpolation == "bicubic"
    assert np.allclose(pre.mean, (0.485, 0.456, 0.406))
    img = smooth_image(3, (320, 200))
    pixels = pre(img)  # the resize, where the upload is decoded: uint8 at the input size
    assert pixels.dtype == np.uint8 and pixels.shape == (224, 224, 3)
    # scaling and normalisation, batched on the model's device: the same float32 operations as
    # torchvision's ToTensor + Normalize, so the same values to the last bit
    engine = Engine(m, torch.device("cpu"))
    x = engine.prepare(torch.from_numpy(np.stack([pixels, pixels])))
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    torch.testing.assert_close(x[1], ref.preprocess(img, m), atol=0, rtol=0)


def test_labels_fall_back_from_config_to_imagenet_to_numbers():
    m = make_model("deit_tiny_patch16_224")
    assert class_labels(m)[281].startswith("tabby")
    m.pretrained_cfg = {**m.pretrained_cfg, "label_names": [f"n{i}" for i in range(1000)]}
    assert class_labels(m)[3] == "n3"
    small = make_model("vit_small_patch32_224")
    small.reset_classifier(7)
    assert class_labels(small) == [f"class {i}" for i in range(7)]
