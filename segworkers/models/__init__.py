"""The model zoo: build any architecture by name.

    create("unet_padded", num_classes=3, in_channels=6) -> nn.Module

Every model maps (N, C, H, W) to logits (N, K, H, W). Builders register themselves with
`segworkers.models.registry.register` in the module of their architecture family; importing
this package imports every family.
"""

from segworkers.models import deeplab, deeplab_v1, fcn, nnunet3d, segformer, unet, unetpp  # noqa: F401
from segworkers.models.registry import create, names, parameter_count, register

__all__ = ["create", "names", "parameter_count", "register"]
