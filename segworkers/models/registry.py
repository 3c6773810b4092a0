"""The model registry itself: builder functions by name. A leaf module: the architecture
families import `register` from here, and `segworkers.models` imports the families, so no
import goes in a circle."""

from __future__ import annotations

from typing import Callable

from torch import nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def decorate(builder: Callable[..., nn.Module]):
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} registered twice")
        _BUILDERS[name] = builder
        return builder

    return decorate


def names() -> list[str]:
    return sorted(_BUILDERS)


def parameter_count(name: str, num_classes: int = 21, in_channels: int = 3, **options) -> int:
    """Parameters of a model, counted on the meta device: nothing is allocated or initialised."""
    import torch

    with torch.device("meta"):
        model = create(name, num_classes=num_classes, in_channels=in_channels, **options)
    return sum(p.numel() for p in model.parameters())


def create(name: str, num_classes: int, in_channels: int, **options) -> nn.Module:
    if name not in _BUILDERS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(names())}")
    return _BUILDERS[name](num_classes=num_classes, in_channels=in_channels, **options)
