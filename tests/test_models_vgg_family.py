"""FCN-32s/16s/8s and DeepLab v1 (LargeFOV) on VGG16: sizes, parameter counts against the
papers, bilinear deconvolutions, and learning on the nuclei image."""

import time

import pytest
import torch
import torch.nn.functional as F

from segworkers.models import create
from segworkers.models.vgg import VGG16, ConvolutionalisedClassifier
from training import foreground_iou, nuclei_halves, predict_padded, train

MODELS = ["fcn32s", "fcn16s", "fcn8s", "deeplab_v1"]


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("num_classes, in_channels", [(1, 3), (2, 1), (5, 4)])
def test_logits_have_the_input_size(name, num_classes, in_channels):
    model = create(name, num_classes=num_classes, in_channels=in_channels, width=4).eval()
    # odd multiples of the stride: any size the stride allows, not only powers of two
    height, width = 3 * model.output_stride, 5 * model.output_stride
    with torch.no_grad():
        logits = model(torch.randn(2, in_channels, height, width))
    assert logits.shape == (2, num_classes, height, width)


@pytest.mark.parametrize("name, stride", [("fcn32s", 32), ("fcn16s", 32), ("fcn8s", 32), ("deeplab_v1", 8)])
def test_output_stride_is_the_stride_of_the_deepest_features(name, stride):
    model = create(name, num_classes=2, in_channels=1, width=4)
    assert model.output_stride == stride and isinstance(model.output_stride, int)
    assert model.halo == 0 and isinstance(model.halo, int)
    with torch.no_grad():
        pools = model.backbone(torch.zeros(1, 1, 7 * 32, 3 * 32))
    # FCN's skips read pool3 and pool4 at strides 8 and 16; DeepLab v1's pool4 and pool5 keep stride 8
    expected = [2, 4, 8, 16, 32] if stride == 32 else [2, 4, 8, 8, 8]
    assert [tuple(p.shape[-2:]) for p in pools] == [(7 * 32 // s, 3 * 32 // s) for s in expected]


def test_vgg16_with_its_classifier_has_the_published_size():
    # Simonyan & Zisserman 2015, Table 2: configuration D has 138M parameters (1000 classes).
    with torch.device("meta"):
        features = VGG16(3)
        classifier = ConvolutionalisedClassifier(features.channels[-1], 4096, 1000, kernel_size=7)
    count = parameter_count(features) + parameter_count(classifier)
    assert abs(count - 138e6) / 138e6 < 0.03, count


@pytest.mark.parametrize("name", ["fcn32s", "fcn16s", "fcn8s"])
def test_fcn_parameter_count_matches_the_paper(name):
    # Long et al., CVPR 2015, Table 1: FCN-VGG16 has 134M parameters (21 PASCAL classes). The
    # skip score layers and 2x deconvolutions of FCN-16s/8s add about 30k; the fixed final
    # upsampling has no parameters here (the reference's frozen deconvolution filters would add
    # 1.8M for FCN-32s).
    with torch.device("meta"):
        model = create(name, num_classes=21, in_channels=3)
    count = parameter_count(model)
    assert abs(count - 134e6) / 134e6 < 0.03, count


def test_deeplab_large_fov_parameter_count_matches_the_paper():
    # Chen et al., ICLR 2015, Table 2: DeepLab-LargeFOV (fc6 3x3, input stride 12, 1024
    # channels) has 20.5M parameters (21 PASCAL classes).
    with torch.device("meta"):
        model = create("deeplab_v1", num_classes=21, in_channels=3)
    count = parameter_count(model)
    assert abs(count - 20.5e6) / 20.5e6 < 0.03, count
    fc6 = model.classifier.fc6[0]
    assert (fc6.kernel_size, fc6.dilation, fc6.out_channels) == ((3, 3), (12, 12), 1024)


@pytest.mark.parametrize("stage", [0, 1])
def test_fcn_deconvolution_starts_as_bilinear_interpolation(stage):
    upsample = create("fcn8s", num_classes=3, in_channels=1, width=4).upsample2x[stage]
    assert upsample.weight.requires_grad  # learned after the bilinear start (Sec. 4.3)
    levels = torch.tensor([1.0, -2.0, 5.0])
    with torch.no_grad():
        flat = upsample(levels[None, :, None, None].expand(1, 3, 6, 7))
        image = torch.randn(1, 3, 6, 7)
        upsampled = upsample(image)
    assert flat.shape[-2:] == (12, 14)
    # each channel from itself only; the outer ring misses neighbours beyond the border
    torch.testing.assert_close(flat[..., 1:-1, 1:-1], levels[None, :, None, None].expand(1, 3, 10, 12))
    bilinear = F.interpolate(image, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsampled[..., 1:-1, 1:-1], bilinear[..., 1:-1, 1:-1])


def test_fcn16s_from_fcn32s_starts_with_unmodified_predictions():
    # Sec. 4.2: FCN-16s starts from FCN-32s's parameters, its new pool4 layer zero-initialised
    # and its 2x deconvolution bilinear, "so that the net starts with unmodified predictions".
    # Scores that are constant per class make "unmodified" exact: bilinear 2x-then-16x and 32x
    # differ by corner cutting on scores that vary.
    coarse = create("fcn32s", num_classes=3, in_channels=1, width=4).eval()
    levels = torch.tensor([1.5, -0.5, 3.0])
    with torch.no_grad():
        coarse.classifier.score.bias.copy_(levels)
    fine = create("fcn16s", num_classes=3, in_channels=1, width=4).eval()
    missing, unexpected = fine.load_state_dict(coarse.state_dict(), strict=False)
    assert not unexpected and all(key.startswith(("skip_scores", "upsample2x")) for key in missing)
    x = torch.rand(1, 1, 6 * 32, 5 * 32)
    with torch.no_grad():
        pools = fine.backbone(x)
        before, after = coarse(x), fine(x)
    assert pools[3].abs().sum() > 0  # the skip sees real pool4 features
    expected = levels[None, :, None, None].expand_as(before)
    torch.testing.assert_close(before, expected)
    # the deconvolution's outer ring misses neighbours beyond the border: 16 + 8 pixels here
    torch.testing.assert_close(after[..., 24:-24, 24:-24], expected[..., 24:-24, 24:-24])


def test_fcn8s_learns_nuclei():
    torch.set_num_threads(2)
    train_x, train_y, test_x, test_y = nuclei_halves()
    torch.manual_seed(0)
    model = create("fcn8s", num_classes=2, in_channels=1, width=8)
    start = time.process_time()
    train(model, train_x, train_y, steps=300, crop=96, batch=4, lr=2e-3)
    iou = foreground_iou(predict_padded(model, test_x, model.output_stride), test_y)
    seconds = time.process_time() - start
    assert iou >= 0.8, f"foreground IoU {iou:.3f} after 300 steps, {seconds:.0f} s CPU"
