"""The paper networks of docs/benchmarks.md, as plain ``nn.Module``s.

- ``mlp((1, 40, 40, 1))``: the sinusoid regressor (W1).
- ``conv4(variant="strided")``: Omniglot's conv4, 4 × [Conv 3×3 stride 2 pad 1 → BatchNorm
  → ReLU] → Flatten → Linear (W2, W3).
- ``conv4(variant="pool")``: miniImageNet's conv4, 4 × [Conv 3×3 pad 1 → BatchNorm → ReLU
  → MaxPool 2] → Flatten → Linear (W4).

Each sets ``model.example_shape``, the shape of one input example it was built for
(``(1,)``, ``(1, 28, 28)``, ``(3, 84, 84)``): the learners name it when an input does not fit.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "leaky_relu": nn.LeakyReLU}


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}") from None


def mlp(sizes: Sequence[int] = (1, 40, 40, 1), activation: str = "relu") -> nn.Sequential:
    """Linear layers of the given widths with ``activation`` between them (none after the last)."""
    sizes = list(sizes)
    if len(sizes) < 2 or any(not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"sizes must be at least two positive ints, got {sizes}")
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(_activation(activation))
    model = nn.Sequential(*layers)
    model.example_shape = (sizes[0],)
    return model


def _conv4_output_size(size: int, variant: str) -> int:
    for _ in range(4):
        size = (size + 2 - 3) // 2 + 1 if variant == "strided" else size // 2
    return size


def conv4(
    in_channels: int = 1,
    ways: int = 5,
    hidden: int | None = None,
    variant: str = "strided",
    image_size: int | None = None,
    activation: str = "relu",
) -> nn.Sequential:
    """The MAML paper's 4-block convnet.

    variant "strided" (Omniglot; defaults: 64 filters, 28×28 input → 256 features) or
    "pool" (miniImageNet; defaults: 32 filters, 84×84 input → 800 features).
    """
    if variant not in ("strided", "pool"):
        raise ValueError(f"variant must be 'strided' or 'pool', got {variant!r}")
    hidden = hidden if hidden is not None else (64 if variant == "strided" else 32)
    image_size = image_size if image_size is not None else (28 if variant == "strided" else 84)
    final = _conv4_output_size(image_size, variant)
    if final < 1:
        raise ValueError(f"image_size {image_size} is too small for four {variant} blocks")
    blocks: list[nn.Module] = []
    channels = in_channels
    for _ in range(4):
        if variant == "strided":
            blocks += [nn.Conv2d(channels, hidden, 3, stride=2, padding=1)]
        else:
            blocks += [nn.Conv2d(channels, hidden, 3, padding=1)]
        blocks += [nn.BatchNorm2d(hidden), _activation(activation)]
        if variant == "pool":
            blocks.append(nn.MaxPool2d(2))
        channels = hidden
    model = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(hidden * final * final, ways))
    model.example_shape = (in_channels, image_size, image_size)
    return model
