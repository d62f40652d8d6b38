"""`make train-demo`'s code path, in miniature: both patch embeddings train, save and load as plain timm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from demo import train
from demo.scenes import CLASS_NAMES
from service import methods
from service.engine.engine import Engine


@pytest.mark.parametrize("backbone", sorted(train.BACKBONES))
@pytest.mark.slow
def test_training_writes_a_local_dir_model_the_service_can_serve(tmp_path: Path, backbone: str) -> None:
    out = tmp_path / backbone
    train.main(
        ["--backbone", backbone, "--pool", "32", "--steps-low", "2", "--steps-high", "1", "--batch-high", "8",
         "--eval-n", "8", "--out", str(out)]
    )  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["label_names"] == CLASS_NAMES
    assert config["pretrained_cfg"]["mean"] == config["pretrained_cfg"]["std"] == [0.5, 0.5, 0.5]

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    engine = Engine(model, torch.device("cpu"))
    assert engine.grid == (14, 14) and engine.num_heads == 3 and engine.input_size == (train.SIZE, train.SIZE)
    engine.warmup(methods.warmup_jobs())  # the service's own readiness step
