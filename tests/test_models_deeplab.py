"""DeepLab v2 / v3 / v3+ and their dilated ResNet encoder: shapes, dilation, parameter counts
against independent references, and learning on the real nuclei image."""

import time

import pytest
import torch
import torchvision
from torchvision.models.segmentation import deeplabv3_resnet50, deeplabv3_resnet101
from torchvision.models.segmentation.deeplabv3 import ASPP as TorchvisionASPP

from segworkers import models
from segworkers.models.resnet import ResNet
from training import foreground_iou, nuclei_halves, predict_padded, train

PASCAL_CLASSES = 21


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def assert_within_3_percent(count: int, reference: int):
    assert abs(count - reference) <= 0.03 * reference, f"{count} parameters vs reference {reference}"


def torchvision_encoder_count(layout: str) -> int:
    """torchvision's ResNet (an independent implementation of He et al. 2016) without its fc."""
    resnet = getattr(torchvision.models, layout)(weights=None)
    return parameter_count(resnet) - parameter_count(resnet.fc)


def classifier_count(channels: int, classes: int) -> int:
    return channels * classes + classes


def conv_bn_count(in_channels: int, out_channels: int, kernel_size: int) -> int:
    return kernel_size**2 * in_channels * out_channels + 2 * out_channels


@pytest.mark.parametrize(
    "name, options, size",
    [
        ("deeplab_v2", {}, (40, 56)),
        ("deeplab_v3", {"output_stride": 16}, (48, 80)),
        ("deeplab_v3", {"output_stride": 8, "backbone": "resnet50"}, (40, 56)),
        ("deeplab_v3plus", {"output_stride": 16}, (48, 80)),
        ("deeplab_v3plus", {"output_stride": 8}, (40, 56)),
    ],
)
def test_logits_have_the_input_size_at_odd_multiples_of_the_stride(name, options, size):
    model = models.create(name, num_classes=5, in_channels=4, **options).eval()
    stride = options.get("output_stride", 8)
    assert model.output_stride == stride and model.halo == 0
    assert all(s % stride == 0 and (s // stride) % 2 == 1 for s in size)
    with torch.no_grad():
        logits = model(torch.randn(2, 4, *size))
    assert logits.shape == (2, 5, *size)


@pytest.mark.parametrize(
    "output_stride, strides, stage_rates",
    [
        # DeepLab v3 Sec. 3.2: at output stride 16 with multi-grid (1, 2, 4), block4 has rates 2 * (1, 2, 4).
        (16, (4, 8, 16, 16), [(1,) * 3, (1,) * 4, (1,) * 6, (2, 4, 8)]),
        # At 8 the third stage is dilated by 2 and the last by 4 (DeepLab v2 Sec. 3.1, v3 Sec. 3.1).
        (8, (4, 8, 8, 8), [(1,) * 3, (1,) * 4, (2,) * 6, (4, 8, 16)]),
        (32, (4, 8, 16, 32), [(1,) * 3, (1,) * 4, (1,) * 6, (1, 2, 4)]),
    ],
)
def test_encoder_trades_stride_for_dilation(output_stride, strides, stage_rates):
    encoder = ResNet(in_channels=1, layout="resnet50", output_stride=output_stride, width=8, multi_grid=(1, 2, 4))
    with torch.no_grad():
        features = encoder(torch.randn(1, 1, 96, 160))
    assert [f.shape[-2:] for f in features] == [(96 // s, 160 // s) for s in strides]
    assert [f.shape[1] for f in features] == encoder.channels == [32, 64, 128, 256]
    rates = [tuple(block.residual[1][0].dilation[0] for block in stage) for stage in encoder.stages]
    assert rates == stage_rates


def test_aspp_rates_double_at_output_stride_8():
    """DeepLab v3 Sec. 3.3: rates (6, 12, 18) at output stride 16 are doubled at 8."""
    for output_stride, expected in [(16, (6, 12, 18)), (8, (12, 24, 36))]:
        model = models.create("deeplab_v3plus", 2, 1, backbone="resnet50", width=8, output_stride=output_stride)
        rates = tuple(branch[0].dilation[0] for branch in model.head.aspp.branches[1:])
        assert rates == expected


@pytest.mark.parametrize("options", [{"output_stride": 4}, {"backbone": "resnet34"}, {"multi_grid": (1, 2)}])
def test_unsupported_options_are_refused(options):
    with pytest.raises(ValueError):
        models.create("deeplab_v3", 2, 1, width=8, **options)


@pytest.mark.parametrize(
    "layout, torchvision_builder", [("resnet101", deeplabv3_resnet101), ("resnet50", deeplabv3_resnet50)]
)
def test_deeplab_v3_parameters_match_torchvision(layout, torchvision_builder):
    """Reference: torchvision's deeplabv3_resnet101 / _resnet50 (weights=None, no auxiliary
    head), counted here. torchvision's head adds a 3x3 256->256 convolution after the ASPP that
    the paper (Sec. 3.3) does not have, so ours is 1.0% (ResNet-101) / 1.5% (ResNet-50) smaller."""
    torchvision_model = torchvision_builder(
        weights=None, weights_backbone=None, num_classes=PASCAL_CLASSES, aux_loss=False
    )
    reference = parameter_count(torchvision_model)
    model = models.create("deeplab_v3", PASCAL_CLASSES, 3, backbone=layout)
    assert_within_3_percent(parameter_count(model), reference)


def test_deeplab_v3_and_v3plus_parameters_match_their_components():
    """Reference built from independent parts: torchvision's ResNet-101 without fc, torchvision's
    ASPP module at 256 channels and rates (6, 12, 18) (the design of v3 Sec. 3.3), the 1x1
    classifier, and for v3+ the decoder of v3+ Sec. 3.1 counted from the paper's numbers: a 1x1
    convolution 256 -> 48 and two 3x3 convolutions of 256 over the 256 + 48 concatenation, each
    with batch norm (a bias-free convolution and 2 parameters per channel)."""
    encoder = torchvision_encoder_count("resnet101")
    aspp = parameter_count(TorchvisionASPP(2048, [6, 12, 18], 256))
    v3 = encoder + aspp + classifier_count(256, PASCAL_CLASSES)
    decoder = conv_bn_count(256, 48, 1) + conv_bn_count(256 + 48, 256, 3) + conv_bn_count(256, 256, 3)
    assert_within_3_percent(parameter_count(models.create("deeplab_v3", PASCAL_CLASSES, 3)), v3)
    assert_within_3_percent(parameter_count(models.create("deeplab_v3plus", PASCAL_CLASSES, 3)), v3 + decoder)


def test_deeplab_v2_parameters_match_its_components():
    """Reference: torchvision's ResNet-101 without fc plus ASPP-L of v2 Sec. 3.2 counted from
    the paper: four 3x3 convolutions 2048 -> classes with bias."""
    reference = torchvision_encoder_count("resnet101") + 4 * (9 * 2048 * PASCAL_CLASSES + PASCAL_CLASSES)
    assert_within_3_percent(parameter_count(models.create("deeplab_v2", PASCAL_CLASSES, 3)), reference)


def test_small_deeplab_v3plus_learns_nuclei():
    """A ResNet-50 layout at a quarter of the width (base 16, ASPP 64, low-level 12 channels)."""
    torch.set_num_threads(2)
    x, y, x_test, y_test = nuclei_halves()
    torch.manual_seed(0)
    model = models.create("deeplab_v3plus", num_classes=2, in_channels=1, backbone="resnet50", width=16)
    start = time.process_time()
    train(model, x, y, steps=200, crop=96, batch=4, lr=2e-3)
    seconds = time.process_time() - start
    iou = foreground_iou(predict_padded(model, x_test, model.output_stride), y_test)
    assert iou >= 0.8, f"foreground IoU {iou:.3f} after {seconds:.0f} s CPU"
