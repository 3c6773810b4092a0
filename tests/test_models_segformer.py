"""SegFormer B0..B5 (segworkers/models/segformer.py): sizes, published parameter counts, the
paper's encoder design (no positional encoding, sequence reduction, stochastic depth), and
learning on the real nuclei image."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from segworkers.models import create
from segworkers.models.segformer import DropPath, EfficientSelfAttention
from training import foreground_iou, nuclei_halves, predict_padded, train

# A tiny configuration with the paper's structure (4 stages, heads 1, 2, 5, 8) for fast tests.
SMALL = dict(embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1), decoder_dim=32)

# Total parameters (millions) with the 150 ADE20K classes: Table 1 of Xie et al. 2021
# ("Params" Total column: encoder + decoder), the same figures as in Table 7 / the appendix.
PUBLISHED_PARAMS_M = {"b0": 3.8, "b1": 13.7, "b2": 27.5, "b3": 47.3, "b4": 64.1, "b5": 84.7}


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (29, 29), (33, 47), (97, 131), (200, 75)])
def test_logits_have_the_input_size_for_any_size(size):
    torch.manual_seed(0)
    model = create("segformer_b0", num_classes=3, in_channels=1, **SMALL).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 1, *size))
    assert logits.shape == (2, 3, *size)
    assert torch.isfinite(logits).all()
    assert model.output_stride == 32 and model.halo == 0


def test_full_b0_on_rgb_and_stage_strides():
    model = create("segformer_b0", num_classes=5, in_channels=3).eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        features = model.encoder(x)
        logits = model(x)
    assert [tuple(f.shape[1:]) for f in features] == [
        (32, 24, 32),
        (64, 12, 16),
        (160, 6, 8),
        (256, 3, 4),
    ]
    assert logits.shape == (2, 5, 96, 128)


def test_too_small_input_is_refused_with_a_clear_error():
    model = create("segformer_b0", num_classes=2, in_channels=1, **SMALL).eval()
    with pytest.raises(ValueError, match="reduction ratio"):
        model(torch.randn(1, 1, 28, 64))


def test_unknown_option_is_refused():
    with pytest.raises(TypeError):
        create("segformer_b0", num_classes=2, in_channels=1, embed_dim=32)


@pytest.mark.parametrize("variant", sorted(PUBLISHED_PARAMS_M))
def test_parameter_count_matches_the_paper(variant):
    model = create(f"segformer_{variant}", num_classes=150, in_channels=3)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    published = PUBLISHED_PARAMS_M[variant]
    assert abs(millions - published) / published < 0.03, f"{variant}: {millions:.2f} M vs {published} M"


def test_no_positional_encoding():
    """Sec. 3.1: position comes only from the Mix-FFN's zero-padded depthwise convolution, so
    every parameter belongs to a linear, convolution or normalisation layer; there is no free
    (e.g. positional embedding) tensor anywhere."""
    model = create("segformer_b0", num_classes=2, in_channels=3)
    layer_types = (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.BatchNorm2d)
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        assert not own or isinstance(module, layer_types), type(module).__name__
    assert not [name for name, _ in model.named_parameters() if "pos" in name]


@pytest.mark.parametrize("ratios", [(8, 4, 2, 1), (4, 2, 1, 1)])
def test_keys_and_values_come_from_the_reduced_sequence(ratios):
    """Eq. 2: stage i attends from its (H / s_i) (W / s_i) tokens to (H / s_i R_i)(W / s_i R_i)
    reduced ones; the default ratios are the paper's 8, 4, 2, 1."""
    options = {} if ratios == (8, 4, 2, 1) else {"reduction_ratios": ratios}
    model = create("segformer_b0", num_classes=2, in_channels=1, **options).eval()
    lengths = []
    attentions = [m for m in model.modules() if isinstance(m, EfficientSelfAttention)]
    for attention in attentions:
        attention.q.register_forward_hook(lambda m, i, o: lengths.append(("q", i[0].shape[1])))
        attention.kv.register_forward_hook(lambda m, i, o: lengths.append(("kv", i[0].shape[1])))
    height, width = 256, 192
    with torch.no_grad():
        model(torch.zeros(1, 1, height, width))

    expected = []
    for stride, ratio, depth in zip((4, 8, 16, 32), ratios, (2, 2, 2, 2)):
        grid = (height // stride) * (width // stride)
        expected += [("q", grid), ("kv", grid // ratio**2)] * depth
    assert lengths == expected
    assert [a.reduction_ratio for a in attentions] == [r for r in ratios for _ in range(2)]


def test_stochastic_depth_grows_linearly_and_drops_whole_samples():
    model = create("segformer_b2", num_classes=2, in_channels=1, drop_path_rate=0.3)
    rates = [m.probability for m in model.modules() if isinstance(m, DropPath)]
    assert len(rates) == 3 + 4 + 6 + 3
    assert rates == pytest.approx(torch.linspace(0, 0.3, 16).tolist())

    drop = DropPath(0.5).train()
    torch.manual_seed(0)
    out = drop(torch.ones(1000, 4, 3))
    per_sample = out.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()
    assert 400 < int((per_sample == 0).all(1).sum()) < 600
    assert torch.equal(drop.eval()(torch.ones(3, 2)), torch.ones(3, 2))


def test_b0_learns_nuclei(record_property):
    """SegFormer-B0 on one channel, trained on the left half of the nuclei image and measured
    on the right half. 100 steps of Adam (lr 1e-3) on 128 px crops without drop path reach
    IoU 0.87-0.88 for seeds 0-2 (about 16 s CPU on one thread)."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = nuclei_halves()
    model = create("segformer_b0", num_classes=2, in_channels=1, drop_path_rate=0.0)
    start = time.process_time()
    train(model, x_train, y_train, steps=100, crop=128, batch=4, lr=1e-3)
    iou = foreground_iou(predict_padded(model, x_test, model.output_stride), y_test)
    record_property("cpu_seconds", round(time.process_time() - start, 1))
    record_property("foreground_iou", round(iou, 3))
    assert iou >= 0.8
