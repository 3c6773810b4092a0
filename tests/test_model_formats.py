"""Every card format loads its weights from files and segments the real scene: a registry
architecture with a state dict, the same network as TorchScript and as a torch.export program,
an smp directory."""

import numpy as np
import rasterio
import segmentation_models_pytorch as smp
import torch
import yaml

from flows.cli import main
from segworkers import models

CLASSES = [{"id": 0, "name": "a", "color": "#ff0000"}, {"id": 1, "name": "b", "color": "#00ff00"}, {"id": 2, "name": "c", "color": "#0000ff"}]


def write_card(path, **fields):
    card = {
        "name": path.stem,
        "spatial_dims": 2,
        "tile": {"size": 64, "overlap": 0.25},
        "input": {"bands": [1, 2, 3, 4, 5, 6], "scale": 1e-4},
        "classes": CLASSES,
        **fields,
    }
    path.write_text(yaml.safe_dump(card))
    return path


def segment(scene, card, out):
    assert main(["segment", str(scene), "--model", str(card), "--out", str(out), "--batch", "2"]) == 0
    with rasterio.open(out / scene.stem / "labels.tif") as labels:
        return labels.read(1)


def small_unet():
    torch.manual_seed(0)
    return models.create("unet_padded", num_classes=3, in_channels=6, base_features=8, depth=2).eval()


def write_registry_card(folder, net):
    """The network's state dict and a registry card for it (the reference the other formats match)."""
    torch.save(net.state_dict(), folder / "unet.pt")
    return write_card(folder / "registry.yaml", format="registry", weights="unet.pt",
                      architecture="unet_padded", architecture_options={"base_features": 8, "depth": 2})


def test_registry_and_torchscript_cards_give_the_same_labels(ray_cluster, sentinel_scene, tmp_path):
    net = small_unet()
    torch.jit.trace(net, torch.zeros(2, 6, 64, 64)).save(str(tmp_path / "unet.ts"))
    registry_card = write_registry_card(tmp_path, net)
    script_card = write_card(tmp_path / "script.yaml", format="torchscript", weights="unet.ts")

    from_registry = segment(sentinel_scene, registry_card, tmp_path / "registry")
    from_script = segment(sentinel_scene, script_card, tmp_path / "script")
    assert from_registry.shape == (200, 300)
    assert len(np.unique(from_registry)) > 1, "a random U-Net still separates some pixels"
    assert (from_registry == from_script).mean() > 0.999


def test_a_torch_export_program_gives_the_labels_of_its_network(ray_cluster, sentinel_scene, tmp_path):
    net = small_unet()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(net, (torch.zeros(2, 6, 64, 64),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "unet.pt2")
    registry_card = write_registry_card(tmp_path, net)
    exported_card = write_card(tmp_path / "exported.yaml", format="export", weights="unet.pt2")

    from_registry = segment(sentinel_scene, registry_card, tmp_path / "registry")
    from_export = segment(sentinel_scene, exported_card, tmp_path / "export")
    assert from_export.shape == (200, 300)
    assert (from_registry == from_export).mean() > 0.999

    # A program exported for 64² tiles cannot take 96²: one line before any work, not a traceback.
    assert main(["segment", str(sentinel_scene), "--model", str(exported_card), "--out", str(tmp_path / "bad"),
                 "--tile", "96"]) == 2
    # A pickle in its place is refused without being run, as for state dicts.
    torch.save({"not": "a program"}, tmp_path / "pickle.pt2")
    pickled_card = write_card(tmp_path / "pickled.yaml", format="export", weights="pickle.pt2")
    assert main(["segment", str(sentinel_scene), "--model", str(pickled_card), "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad" / sentinel_scene.stem).exists()


def test_smp_directory_card(ray_cluster, sentinel_scene, tmp_path):
    torch.manual_seed(0)
    net = smp.Unet("resnet18", encoder_weights=None, in_channels=6, classes=3, encoder_depth=3, decoder_channels=(32, 16, 8))
    net.save_pretrained(str(tmp_path / "smp-unet"))
    card = write_card(tmp_path / "smp.yaml", format="smp", weights="smp-unet")
    labels = segment(sentinel_scene, card, tmp_path / "out")
    assert labels.shape == (200, 300) and labels.max() <= 2
