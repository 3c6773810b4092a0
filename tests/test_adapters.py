"""Every way a model comes in gives the same logits as the native network it was saved from:
ONNX and TorchScript exports of a registry model, segmentation_models_pytorch by name and by
save_pretrained directory, torchvision segmentation models from a state dict."""

from pathlib import Path

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
import torchvision.models.segmentation as tvseg
import yaml
from safetensors.torch import save_file

from flows.cli import main
from pipelines.errors import InputError
from pipelines.model_card import load_card
from segworkers import models
from segworkers.tile_models import TORCHVISION_SEGMENTATION, load_tile_model

RNG = np.random.default_rng(7)


def card_for(tmp_path: Path, name: str, bands: int, classes: int, **fields):
    card = {
        "name": name,
        "tile": {"size": 64},
        "input": {"bands": list(range(1, bands + 1))},
        "classes": [{"id": i, "name": f"c{i}"} for i in range(classes)],
        **fields,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(card))
    return load_card(path)


def native_logits(module: torch.nn.Module, batch: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        out = module.eval()(torch.from_numpy(batch))
    return (out["out"] if isinstance(out, dict) else out).numpy()


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(1)
    return models.create("unet_padded", num_classes=3, in_channels=4, base_features=8, depth=2).eval()


def test_onnx_export_of_a_registry_model(unet, tmp_path):
    batch = RNG.standard_normal((2, 4, 64, 64), dtype=np.float32)
    torch.onnx.export(unet, (torch.from_numpy(batch),), str(tmp_path / "unet.onnx"), dynamo=True,
                      dynamic_shapes={"x": {0: "batch"}})
    model = load_tile_model(card_for(tmp_path, "u-onnx", 4, 3, format="onnx", weights="unet.onnx"), "cpu", 2)
    np.testing.assert_allclose(model(batch), native_logits(unet, batch), atol=1e-5)
    wider = RNG.standard_normal((3, 4, 64, 64), dtype=np.float32)
    np.testing.assert_allclose(model(wider), native_logits(unet, wider), atol=1e-5)


def test_torchscript_and_registry_state_dict(unet, tmp_path):
    batch = RNG.standard_normal((2, 4, 64, 64), dtype=np.float32)
    torch.jit.trace(unet, torch.from_numpy(batch)).save(str(tmp_path / "unet.ts"))
    save_file(unet.state_dict(), str(tmp_path / "unet.safetensors"))
    torch.save(unet.state_dict(), tmp_path / "unet.pt")
    expected = native_logits(unet, batch)
    scripted = load_tile_model(card_for(tmp_path, "u-ts", 4, 3, format="torchscript", weights="unet.ts"), "cpu", 2)
    np.testing.assert_allclose(scripted(batch), expected, atol=1e-6)
    for weights in ("unet.safetensors", "unet.pt"):
        card = card_for(tmp_path, "u-reg", 4, 3, format="registry", weights=weights, architecture="unet_padded",
                        architecture_options={"base_features": 8, "depth": 2})
        # Not bit for bit: the loaded model runs on 2 threads, the native pass on however many this
        # thread has after earlier tests (sums in another order: a few ulp).
        np.testing.assert_allclose(load_tile_model(card, "cpu", 2)(batch), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "architecture,options",
    [("Unet", {"encoder_name": "resnet18"}), ("FPN", {"encoder_name": "resnet18"}),
     ("DeepLabV3Plus", {"encoder_name": "resnet18"}), ("Segformer", {"encoder_name": "mit_b0"})],
)
def test_smp_by_name_and_by_directory(architecture, options, tmp_path):
    torch.manual_seed(2)
    net = smp.create_model(architecture, encoder_weights=None, in_channels=3, classes=4, **options).eval()
    batch = RNG.standard_normal((2, 3, 64, 64), dtype=np.float32)
    expected = native_logits(net, batch)
    save_file(net.state_dict(), str(tmp_path / "net.safetensors"))
    by_name = card_for(tmp_path, "smp-name", 3, 4, format="smp", weights="net.safetensors",
                       architecture=architecture, architecture_options=options)
    np.testing.assert_array_equal(load_tile_model(by_name, "cpu", 2)(batch), expected)
    net.save_pretrained(str(tmp_path / "saved"))
    by_directory = card_for(tmp_path, "smp-dir", 3, 4, format="smp", weights="saved")
    np.testing.assert_array_equal(load_tile_model(by_directory, "cpu", 2)(batch), expected)


@pytest.mark.parametrize("architecture", TORCHVISION_SEGMENTATION)
def test_torchvision_segmentation_models_from_a_state_dict(architecture, tmp_path):
    torch.manual_seed(3)
    net = getattr(tvseg, architecture)(weights=None, weights_backbone=None, num_classes=5, aux_loss=False).eval()
    save_file(net.state_dict(), str(tmp_path / "tv.safetensors"))
    card = card_for(tmp_path, "tv", 3, 5, format="torchvision", weights="tv.safetensors", architecture=architecture)
    batch = RNG.standard_normal((2, 3, 64, 64), dtype=np.float32)
    np.testing.assert_array_equal(load_tile_model(card, "cpu", 2)(batch), native_logits(net, batch))


def test_weights_that_do_not_fit_the_architecture_are_bad_input(unet, tmp_path):
    torch.save(unet.state_dict(), tmp_path / "unet.pt")
    card = card_for(tmp_path, "u-wrong", 4, 3, format="registry", weights="unet.pt", architecture="unet_padded",
                    architecture_options={"base_features": 16, "depth": 2})
    with pytest.raises(InputError, match="cannot load registry model"):
        load_tile_model(card, "cpu", 2)


@pytest.mark.parametrize("fmt,suffix", [("registry", ".pt"), ("registry", ".safetensors"), ("torchscript", ".pt")])
def test_a_weights_file_cut_short_says_so(unet, tmp_path, fmt, suffix):
    """A checkpoint copied only in part: a zip archive without its end (torch says "[Errno 22]
    Invalid argument" or a miniz error) or a safetensors file shorter than its header says
    ("incomplete metadata"). The message says what happened to the file."""
    whole_path = tmp_path / f"whole{suffix}"
    options = {"architecture": "unet_padded", "architecture_options": {"base_features": 8, "depth": 2}}
    if fmt == "torchscript":
        torch.jit.trace(unet, torch.zeros(1, 4, 64, 64)).save(str(whole_path))
        options = {}
    elif suffix == ".safetensors":
        save_file(unet.state_dict(), str(whole_path))
    else:
        torch.save(unet.state_dict(), whole_path)
    whole = whole_path.read_bytes()
    for kept in (4, len(whole) // 2, len(whole) - 30):
        (tmp_path / f"unet{suffix}").write_bytes(whole[:kept])
        card = card_for(tmp_path, "u-cut", 4, 3, format=fmt, weights=f"unet{suffix}", **options)
        with pytest.raises(InputError, match=f"unet{suffix}: .*the file is cut short or damaged .* copy it again"):
            load_tile_model(card, "cpu", 2)


def test_models_list_prints_every_architecture_with_its_parameters(capsys):
    assert main(["models", "list", "--classes", "2"]) == 0
    out = capsys.readouterr().out
    for name in models.names():
        assert name in out
    unet_params = models.parameter_count("unet_padded", num_classes=2, in_channels=3)
    assert unet_params == sum(p.numel() for p in models.create("unet_padded", 2, 3).parameters())
    assert f"{unet_params / 1e6:,.2f} M" in out
    assert "s2-cloud" in out
