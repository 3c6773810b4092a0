"""The U-Net family: the original U-Net (valid convolutions), UNet++ (nested dense skips, deep
supervision, pruning) and No New-Net (3D U-Net): geometry, the papers' layer and parameter
counts, and learning on real data (nuclei image, CT volume)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from segworkers import models
from training import (
    CT_LABELS, CT_VOLUME, center_crop, dice, foreground_iou, nuclei_halves, predict_padded, random_crops, shared_data, train,
)

LIVER = 5


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv_parameters(in_channels: int, out_channels: int, kernel: int, dims: int = 2) -> int:
    """Weights and bias of one (transposed) convolution."""
    return in_channels * out_channels * kernel**dims + out_channels


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice of the foreground (class 1) over the batch."""
    foreground = logits.softmax(1)[:, 1]
    overlap = (foreground * target).sum()
    return 1 - (2 * overlap + 1) / (foreground.sum() + target.sum() + 1)


# --- U-Net (Ronneberger et al. 2015) -------------------------------------------------------


def test_unet_maps_572_to_388_with_a_halo_of_92():
    net = models.create("unet", num_classes=2, in_channels=1, base_features=8).eval()
    assert (net.halo, net.output_stride) == (92, 16)
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 572, 572)).shape == (1, 2, 388, 388)
        assert net(torch.zeros(2, 1, 188, 412)).shape == (2, 2, 4, 228)
    assert net.output_size(572) == 388 and net.output_size(188) == 4


def test_unet_valid_input_size_is_the_smallest_input_covering_an_output():
    net = models.create("unet", num_classes=2, in_channels=1, base_features=8)
    for wanted in range(1, 600):
        size = net.valid_input_size(wanted)
        produced = net.output_size(size)
        assert produced >= wanted and size - produced == 2 * net.halo
        with pytest.raises(ValueError):
            net.output_size(size - 1)
        if size - net.output_stride >= net.valid_input_size(1):
            assert net.output_size(size - net.output_stride) < wanted


def test_unet_output_shifts_with_its_input_so_tiles_stitch_seamlessly():
    """Sec. 2, overlap-tile: moving the input window by the stride moves the output by as much."""
    torch.manual_seed(0)
    net = models.create("unet", num_classes=2, in_channels=1, base_features=4).eval()
    x = torch.randn(1, 1, 236, 236)
    with torch.no_grad():
        whole = net(x)
        shifted = net(x[..., 16:, 32:])
    assert whole.shape[-2:] == (52, 52) and shifted.shape[-2:] == (36, 20)
    torch.testing.assert_close(shifted, whole[..., 16:, 32:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [570, 571, 100])
def test_unet_rejects_an_input_that_does_not_fit_and_names_valid_sizes(size):
    net = models.create("unet", num_classes=2, in_channels=1, base_features=4)
    nearby = {570: "556, 572", 571: "556, 572", 100: "188"}[size]
    with pytest.raises(ValueError, match=f"input size {size}; valid input sizes near it: {nearby}$"):
        net(torch.zeros(1, 1, 572, size))


def test_unet_has_the_papers_23_convolutions_and_31_03M_parameters():
    """Sec. 2: "In total the network has 23 convolutional layers." The paper gives no parameter
    count; counted layer by layer from Fig. 1 (1 input channel as in the EM tiles, 2 classes) it
    is 31,030,658 (the 31.03M quoted for U-Net; also the Keras summary of this network)."""
    net = models.create("unet", num_classes=2, in_channels=1)
    convolutions = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convolutions) == 23
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in convolutions) == 4
    assert all(m.padding == (0, 0) for m in convolutions)

    widths = [64, 128, 256, 512, 1024]
    expected = conv_parameters(64, 2, 1)
    previous = 1
    for width in widths:
        expected += conv_parameters(previous, width, 3) + conv_parameters(width, width, 3)
        previous = width
    for width in widths[:-1]:
        up_and_decode = [(2 * width, width, 2), (2 * width, width, 3), (width, width, 3)]
        expected += sum(conv_parameters(*layer) for layer in up_and_decode)
    assert parameter_count(net) == expected == 31_030_658
    assert abs(parameter_count(net) - 31.03e6) / 31.03e6 < 0.03


def test_padded_and_valid_unet_share_one_state_dict_layout():
    valid = models.create("unet", num_classes=3, in_channels=6, base_features=8, depth=2)
    padded = models.create("unet_padded", num_classes=3, in_channels=6, base_features=8, depth=2)
    valid.load_state_dict(padded.state_dict())
    assert padded.halo == 0 and padded.output_stride == 4
    with torch.no_grad():
        assert padded(torch.zeros(1, 6, 44, 20)).shape == (1, 3, 44, 20)
    with pytest.raises(ValueError, match="valid input sizes near it: 40, 44"):
        padded(torch.zeros(1, 6, 42, 20))


def test_unet_padded_learns_nuclei():
    torch.set_num_threads(2)
    x_train, y_train, x_test, y_test = nuclei_halves()
    torch.manual_seed(0)
    net = models.create("unet_padded", num_classes=2, in_channels=1, base_features=16, depth=3)
    start = time.process_time()
    train(net, x_train, y_train, steps=200, crop=96, batch=4, lr=2e-3)
    iou = foreground_iou(predict_padded(net, x_test, net.output_stride), y_test)
    print(f"unet_padded: IoU {iou:.3f} on the held-out half, {time.process_time() - start:.1f} s CPU")
    assert iou >= 0.8


# --- UNet++ (Zhou et al. 2018, 2019) ---------------------------------------------------------


def unetpp_parameters(in_channels: int, num_classes: int, heads: int) -> int:
    """DLMIA Sec. 2 and 3: node X(i,j) is two 3x3 convolutions with 32 * 2**i filters over the
    pooled X(i-1,0) (j = 0) or over [X(i,0) .. X(i,j-1), U(X(i+1,j-1))] (j > 0)."""
    widths = [32, 64, 128, 256, 512]
    total = heads * conv_parameters(widths[0], num_classes, 1)
    for j in range(5):
        for i in range(5 - j):
            if j == 0:
                inputs = in_channels if i == 0 else widths[i - 1]
            else:
                inputs = (j + 1) * widths[i]
                total += conv_parameters(widths[i + 1], widths[i], 2)
            total += conv_parameters(inputs, widths[i], 3) + conv_parameters(widths[i], widths[i], 3)
    return total


def test_unetpp_has_9_04M_parameters():
    """Table 1 of the DLMIA paper: UNet++ 9.04M; the authors' Keras Nest_Net (MrGiovanni/
    UNetPlusPlus, model.py, one input channel, one class) reports "Total params: 9,041,601"."""
    plain = models.create("unetpp", num_classes=1, in_channels=1)
    supervised = models.create("unetpp", num_classes=1, in_channels=1, deep_supervision=True)
    assert parameter_count(plain) == unetpp_parameters(1, 1, heads=1) == 9_041_601
    assert parameter_count(supervised) == unetpp_parameters(1, 1, heads=4)
    assert abs(parameter_count(plain) - 9.04e6) / 9.04e6 < 0.03


def test_unetpp_deep_supervision_heads_and_accurate_mode():
    torch.manual_seed(0)
    net = models.create("unetpp", num_classes=3, in_channels=2, base_features=4, deep_supervision=True)
    x = torch.randn(2, 2, 48, 80)
    heads = net.train()(x)
    assert isinstance(heads, list) and [h.shape for h in heads] == [(2, 3, 48, 80)] * 4
    assert not torch.allclose(heads[0], heads[3])
    with torch.no_grad():
        averaged = net.eval()(x)
    # accurate mode: the mean of the four heads' probability maps
    torch.testing.assert_close(averaged.softmax(1), torch.stack([h.softmax(1) for h in heads]).mean(0))

    binary = models.create("unetpp", num_classes=1, in_channels=2, base_features=4, deep_supervision=True)
    heads = binary.train()(x)
    with torch.no_grad():
        torch.testing.assert_close(binary.eval()(x).sigmoid(), torch.stack([h.sigmoid() for h in heads]).mean(0))

    plain = models.create("unetpp", num_classes=3, in_channels=2, base_features=4).train()
    assert plain(x).shape == (2, 3, 48, 80)
    with pytest.raises(ValueError, match="divisible by 16"):
        plain(torch.zeros(1, 2, 40, 80))


def test_unetpp_pruned_to_l1_evaluates_only_its_nodes_and_costs_less():
    torch.manual_seed(0)
    net = models.create("unetpp", num_classes=2, in_channels=1, base_features=4, deep_supervision=True)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        heads = net.train()(x)
    net.eval()
    evaluated = []
    hooks = [node.register_forward_hook(lambda *_, key=key: evaluated.append(key)) for key, node in net.nodes.items()]
    flops = {}
    for level in (1, 2, 3, 4):
        net.prune_level = level
        evaluated.clear()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            pruned = net(x)
        flops[level] = counter.get_total_flops()
        expected_nodes = {f"x{i}_{j}" for j in range(level + 1) for i in range(level + 1 - j)}
        assert set(evaluated) == expected_nodes and len(evaluated) == len(expected_nodes)
        # fast mode reads the level's own head: the same map the full network supervises there
        torch.testing.assert_close(pruned, heads[level - 1])
    for hook in hooks:
        hook.remove()
    assert flops[1] < flops[2] < flops[3] < flops[4]
    assert flops[1] < 0.2 * flops[4]
    net.prune_level = 1
    with torch.no_grad():
        assert net(torch.randn(1, 1, 34, 50)).shape == (1, 2, 34, 50), "L1 pools once: even sizes suffice"


def test_unetpp_pruning_needs_deep_supervision():
    with pytest.raises(ValueError, match="deep_supervision"):
        models.create("unetpp", num_classes=2, in_channels=1, base_features=4, prune_level=2)


def test_unetpp_learns_nuclei_with_deep_supervision():
    """DLMIA Sec. 2: the loss is applied to each of the four heads; measured in accurate mode
    and pruned to L2."""
    torch.set_num_threads(2)
    x_train, y_train, x_test, y_test = nuclei_halves()
    torch.manual_seed(0)
    net = models.create("unetpp", num_classes=2, in_channels=1, base_features=8, deep_supervision=True)
    generator = torch.Generator().manual_seed(0)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    start = time.process_time()
    net.train()
    for _ in range(300):
        inputs, targets = random_crops(x_train, y_train, 96, 4, generator)
        heads = net(inputs)
        loss = sum(F.cross_entropy(h, targets) + soft_dice_loss(h, targets) for h in heads) / len(heads)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    net.eval()
    iou = foreground_iou(predict_padded(net, x_test, net.output_stride), y_test)
    net.prune_level = 2
    pruned_iou = foreground_iou(predict_padded(net, x_test, net.output_stride), y_test)
    print(f"unetpp: IoU {iou:.3f} (accurate), {pruned_iou:.3f} (L2), {time.process_time() - start:.1f} s CPU")
    assert iou >= 0.8
    assert pruned_iou >= 0.75


# --- No New-Net (Isensee et al. 2018) --------------------------------------------------------


def no_new_net_convolutions(in_channels: int, num_classes: int, base: int = 30) -> list[tuple[int, int, int]]:
    """(in, out, kernel) of every convolution, in order, from Sec. 2.2 / Fig. 1: two 3x3x3
    convolutions per level (30 .. 480 feature maps), the second convolution of the bottom and of
    every decoder level but the last halving the maps before trilinear upsampling, a 1x1x1
    convolution to the classes."""
    widths = [base * 2**i for i in range(5)]
    layers, previous = [], in_channels
    for width in widths[:4]:
        layers += [(previous, width, 3), (width, width, 3)]
        previous = width
    layers += [(widths[3], widths[4], 3), (widths[4], widths[3], 3)]
    for level in (3, 2, 1, 0):
        layers += [(2 * widths[level], widths[level], 3), (widths[level], widths[max(level - 1, 0)], 3)]
    return layers + [(widths[0], num_classes, 1)]


def test_no_new_net_layers_and_parameter_count():
    """The paper gives no parameter count; derived from Sec. 2.2 for its BraTS setting (4 MRI
    modalities, 3 region outputs) with affine instance normalisation: 14,493,063."""
    net = models.create("nnunet3d", num_classes=3, in_channels=4)
    convolutions = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convolutions] == no_new_net_convolutions(4, 3)
    norms = [m for m in net.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert len(norms) == len(convolutions) - 1 and all(n.affine for n in norms)
    assert {m.negative_slope for m in net.modules() if isinstance(m, nn.LeakyReLU)} == {1e-2}
    assert not any(isinstance(m, nn.ConvTranspose3d) for m in net.modules()), "upsampling is trilinear"

    # every 3x3x3 convolution is followed by an affine instance norm (a scale and a shift per map)
    layers = no_new_net_convolutions(4, 3)
    expected = sum(conv_parameters(i, o, k, dims=3) + (2 * o if k == 3 else 0) for i, o, k in layers)
    documented = 14_493_063
    assert abs(parameter_count(net) - documented) / documented < 0.03
    assert parameter_count(net) == expected


def test_no_new_net_shapes_and_deep_supervision():
    torch.manual_seed(0)
    net = models.create("nnunet3d", num_classes=3, in_channels=2, base_features=4, deep_supervision=True)
    assert (net.output_stride, net.halo) == (16, 0)
    x = torch.randn(1, 2, 16, 48, 32)
    outputs = net.train()(x)
    assert [o.shape for o in outputs] == [(1, 3, 16, 48, 32), (1, 3, 8, 24, 16), (1, 3, 4, 12, 8), (1, 3, 2, 6, 4)]
    with torch.no_grad():
        assert net.eval()(x).shape == (1, 3, 16, 48, 32)
    with pytest.raises(ValueError, match="valid sizes near 30: 16, 32"):
        net(torch.zeros(1, 2, 30, 48, 32))


def ct_liver() -> tuple[torch.Tensor, torch.Tensor]:
    """The CT volume as (1, 1, z, y, x) with HU clipped to [-200, 300] and scaled to [-1, 1],
    and its liver mask, cropped in plane to multiples of 8 (101 x 122 -> 96 x 120)."""
    import nibabel

    volume = np.asanyarray(nibabel.load(shared_data(CT_VOLUME)).dataobj).astype(np.float32)
    labels = np.asanyarray(nibabel.load(shared_data(CT_LABELS)).dataobj)
    x = torch.from_numpy((np.clip(volume, -200, 300) - 50) / 250).permute(2, 1, 0)[None, None]
    liver = torch.from_numpy(labels == LIVER).permute(2, 1, 0).long()
    size = (liver.shape[0], 96, 120)
    cropped = center_crop(liver, size)
    assert cropped.sum() == liver.sum() == 38634, "the crop keeps the whole liver"
    return center_crop(x, size).contiguous(), cropped.contiguous()


def test_no_new_net_fits_the_liver_of_a_ct_volume():
    """Depth 3 at width 8 (the paper: depth 4, width 30, 128^3 patches); each step trains on two
    16-slice windows of the whole in-plane field; the volume is then segmented whole, its 30
    slices padded to 32."""
    torch.set_num_threads(2)
    x, liver = ct_liver()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    net = models.create("nnunet3d", num_classes=2, in_channels=1, base_features=8, depth=3)
    steps, window = 40, 16
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: (1 - step / steps) ** 0.9)
    start = time.process_time()
    net.train()
    for _ in range(steps):
        first = torch.randint(0, liver.shape[0] - window + 1, (2,), generator=generator).tolist()
        inputs = torch.cat([x[:, :, z : z + window] for z in first])
        targets = torch.stack([liver[z : z + window] for z in first])
        logits = net(inputs)
        loss = F.cross_entropy(logits, targets) + soft_dice_loss(logits, targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    net.eval()
    score = dice(predict_padded(net, x, net.output_stride), liver)
    print(f"nnunet3d: liver Dice {score:.3f}, {time.process_time() - start:.1f} s CPU")
    assert score >= 0.8
