"""learn2learn's vision models (``learn2learn.vision.models``), built to its documented
architectures and parameter counts, written as plain modules that ``fm.trace`` runs
batched over tasks (tests/l2l pins the counts and checks that none falls back).

- :class:`OmniglotFC`: Santoro et al.'s MLP, 784 → 256 → 128 → 64 → 64 → classes, each
  hidden layer Linear → BatchNorm1d → ReLU.
- :class:`OmniglotCNN`: Finn et al.'s conv4 for 28×28 Omniglot: 4 × [Conv 3×3 stride 2
  → BatchNorm → ReLU], mean over space, Linear (64 filters).
- :class:`CNN4` (= :class:`MiniImagenetCNN`): Ravi & Larochelle's conv4 for 84×84:
  4 × [Conv 3×3 → BatchNorm → ReLU → MaxPool 2], flatten (25·hidden), Linear.
  :class:`CNN4Backbone` is its feature extractor, :class:`ConvBase` the blocks.
- :class:`ResNet12`: 4 residual blocks of widths 64, 160, 320, 640 (``wider``; else 64,
  128, 256, 512), each 3 × [Conv 3×3 → BatchNorm → LeakyReLU 0.1] with a 1×1 shortcut,
  then MaxPool 2; mean over space (= AvgPool 5 on 84×84): 12.4 M parameters.
- :class:`WRN28`: Wide ResNet 28-10 (Zagoruyko & Komodakis), pre-activation blocks of
  widths 160, 320, 640, mean over space: 36.5 M parameters.

Initialisation follows learn2learn's description (truncated normal for the FC heads,
Xavier for the conv4 convolutions and classifier, Kaiming for the ResNets). Refused
options: ResNet12's DropBlock (``dropblock_dropout`` > 0) and ``get_pretrained_backbone``
(it downloads weights).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastmeta.l2l.nn.misc import Flatten, Lambda

__all__ = [
    "CNN4", "CNN4Backbone", "ConvBase", "ConvBlock", "LinearBlock", "MiniImagenetCNN", "OmniglotCNN",
    "OmniglotFC", "ResNet12", "ResNet12Backbone", "WRN28", "WRN28Backbone", "fc_init_", "get_pretrained_backbone",
    "maml_init_",
]


def fc_init_(module: nn.Module) -> nn.Module:
    """Weights from a normal of std 0.01 truncated at two standard deviations, biases 0."""
    if getattr(module, "weight", None) is not None:
        nn.init.trunc_normal_(module.weight.data, mean=0.0, std=0.01, a=-0.02, b=0.02)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias.data, 0.0)
    return module


def maml_init_(module: nn.Module) -> nn.Module:
    """Xavier-uniform weights, zero biases (the MAML reference code's initialisation)."""
    nn.init.xavier_uniform_(module.weight.data, gain=1.0)
    if module.bias is not None:
        nn.init.constant_(module.bias.data, 0.0)
    return module


class LinearBlock(nn.Module):
    """Linear → BatchNorm1d (ε 1e-3, no running statistics) → ReLU."""

    def __init__(self, input_size: int, output_size: int):
        super().__init__()
        self.relu = nn.ReLU()
        self.normalize = nn.BatchNorm1d(output_size, affine=True, momentum=0.999, eps=1e-3, track_running_stats=False)
        self.linear = fc_init_(nn.Linear(input_size, output_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.normalize(self.linear(x)))


class ConvBlock(nn.Module):
    """Conv 3×3 (padding 1) → BatchNorm2d → ReLU → MaxPool. With max_pool the conv has
    stride 1 and the pool a window and stride of ``2·max_pool_factor``; without it the
    conv has that stride and there is no pool."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, max_pool: bool = True,
                 max_pool_factor: float = 1.0):
        super().__init__()
        stride = (int(2 * max_pool_factor),) * 2
        if max_pool:
            self.max_pool = nn.MaxPool2d(kernel_size=stride, stride=stride, ceil_mode=False)
            stride = (1, 1)
        else:
            self.max_pool = nn.Identity()
        self.normalize = nn.BatchNorm2d(out_channels, affine=True)
        nn.init.uniform_(self.normalize.weight)
        self.relu = nn.ReLU()
        self.conv = maml_init_(nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=1, bias=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.max_pool(self.relu(self.normalize(self.conv(x))))


class ConvBase(nn.Sequential):
    """``layers`` ConvBlocks of ``hidden`` filters (Omniglot: 64 filters, 1 channel, no
    pooling; miniImageNet: 32 filters, 3 channels, pooling). ``output_size`` is accepted
    and ignored, as by learn2learn's earlier ConvBase."""

    def __init__(self, hidden: int = 64, channels: int = 1, max_pool: bool = False, layers: int = 4,
                 max_pool_factor: float = 1.0, *, output_size: int | None = None):
        # output_size: accepted and unused, as in learn2learn's earlier ConvBase (which
        # scripts such as anil_fc100.py still pass).
        blocks = [ConvBlock(channels, hidden, (3, 3), max_pool=max_pool, max_pool_factor=max_pool_factor)]
        blocks += [ConvBlock(hidden, hidden, (3, 3), max_pool=max_pool, max_pool_factor=max_pool_factor)
                   for _ in range(layers - 1)]
        super().__init__(*blocks)


class OmniglotFC(nn.Module):
    """``OmniglotFC(input_size, output_size, sizes=None)``: Flatten, LinearBlocks of
    ``sizes`` (default 256, 128, 64, 64), Linear classifier."""

    def __init__(self, input_size: int, output_size: int, sizes=None):
        super().__init__()
        sizes = [256, 128, 64, 64] if sizes is None else list(sizes)
        blocks = [LinearBlock(input_size, sizes[0])] + [LinearBlock(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
        self.features = nn.Sequential(Flatten(), nn.Sequential(*blocks))
        self.classifier = fc_init_(nn.Linear(sizes[-1], output_size))
        self.input_size = input_size

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class OmniglotCNN(nn.Module):
    """``OmniglotCNN(output_size=5, hidden_size=64, layers=4)`` for ``[1, 28, 28]`` inputs
    (or flat 784-vectors)."""

    def __init__(self, output_size: int = 5, hidden_size: int = 64, layers: int = 4):
        super().__init__()
        self.hidden_size = hidden_size
        self.base = ConvBase(hidden=hidden_size, channels=1, max_pool=False, layers=layers)
        self.features = nn.Sequential(
            Lambda(lambda x: x.view(-1, 1, 28, 28)),
            self.base,
            Lambda(lambda x: x.mean(dim=[2, 3])),
            Flatten(),
        )
        self.classifier = nn.Linear(hidden_size, output_size, bias=True)
        self.classifier.weight.data.normal_()
        self.classifier.bias.data.mul_(0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class CNN4Backbone(ConvBase):
    """ConvBase whose output is flattened to ``[N, features]``."""

    def __init__(self, hidden_size: int = 64, layers: int = 4, channels: int = 3, max_pool: bool = False,
                 max_pool_factor: float = 1.0):
        super().__init__(hidden=hidden_size, layers=layers, channels=channels, max_pool=max_pool,
                         max_pool_factor=max_pool_factor)

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        return x.reshape(x.size(0), -1)


class CNN4(nn.Module):
    """``CNN4(output_size, hidden_size=64, layers=4, channels=3, max_pool=True,
    embedding_size=None)`` for ``[3, 84, 84]`` inputs; embedding_size defaults to
    ``25·hidden_size`` (the 5×5 map of an 84×84 input)."""

    def __init__(self, output_size: int, hidden_size: int = 64, layers: int = 4, channels: int = 3,
                 max_pool: bool = True, embedding_size: int | None = None):
        super().__init__()
        embedding_size = 25 * hidden_size if embedding_size is None else embedding_size
        self.features = CNN4Backbone(hidden_size=hidden_size, channels=channels, max_pool=max_pool, layers=layers,
                                     max_pool_factor=4 // layers)
        self.classifier = maml_init_(nn.Linear(embedding_size, output_size, bias=True))
        self.hidden_size = hidden_size

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


MiniImagenetCNN = CNN4


class _SpatialMean(nn.Module):
    """The mean over the spatial dims: ``[N, C, H, W]`` → ``[N, C]`` (AvgPool over the whole map)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


def _kaiming_(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1.0)
            nn.init.constant_(m.bias, 0.0)


class _ResBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.LeakyReLU(0.1)
        self.conv3 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes))
        self.relu3 = nn.LeakyReLU(0.1)
        self.maxpool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.maxpool(self.relu3(out + self.downsample(x)))


class ResNet12Backbone(nn.Module):
    """ResNet-12's feature extractor: ``[N, channels, H, W]`` → ``[N, 640]`` (``wider``) or ``[N, 512]``."""

    def __init__(self, avg_pool: bool = True, wider: bool = True, embedding_dropout: float = 0.0,
                 dropblock_dropout: float = 0.1, dropblock_size: int = 5, channels: int = 3):
        super().__init__()
        if dropblock_dropout:
            raise ValueError(
                f"ResNet12: dropblock_dropout={dropblock_dropout} (DropBlock) is not implemented in fastmeta; "
                "pass dropblock_dropout=0.0"
            )
        widths = (64, 160, 320, 640) if wider else (64, 128, 256, 512)
        blocks, inplanes = [], channels
        for planes in widths:
            blocks.append(_ResBlock(inplanes, planes))
            inplanes = planes
        self.layers = nn.Sequential(*blocks)
        self.pool = _SpatialMean() if avg_pool else Flatten()
        self.flatten = Flatten()
        self.dropout = nn.Dropout(p=embedding_dropout) if embedding_dropout else nn.Identity()
        _kaiming_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.flatten(self.pool(self.layers(x))))


class ResNet12(nn.Module):
    """``ResNet12(output_size, hidden_size=640, avg_pool=True, wider=True,
    embedding_dropout=0.0, dropblock_dropout=0.1, dropblock_size=5, channels=3)``.

    DropBlock is refused: pass ``dropblock_dropout=0.0``. With ``avg_pool`` the features
    are the mean over the last map (learn2learn's AvgPool 5 on an 84×84 input, the same
    there, and defined on other sizes too)."""

    def __init__(self, output_size: int, hidden_size: int = 640, avg_pool: bool = True, wider: bool = True,
                 embedding_dropout: float = 0.0, dropblock_dropout: float = 0.1, dropblock_size: int = 5,
                 channels: int = 3):
        super().__init__()
        self.features = ResNet12Backbone(avg_pool, wider, embedding_dropout, dropblock_dropout, dropblock_size,
                                         channels)
        self.classifier = nn.Linear(hidden_size, output_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class _WideBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.equal = inplanes == planes and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(pre)))
        out = self.conv2(self.dropout(out))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WRN28Backbone(nn.Module):
    """WRN-28-``widen_factor``'s feature extractor: ``[N, 3, H, W]`` → ``[N, 64·widen_factor]``."""

    def __init__(self, dropout: float = 0.0, widen_factor: int = 10, channels: int = 3):
        super().__init__()
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(channels, widths[0], 3, padding=1, bias=False)
        groups, inplanes = [], widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            blocks = [_WideBlock(inplanes if i == 0 else planes, planes, stride if i == 0 else 1, dropout)
                      for i in range(4)]  # (28 - 4) / 6 = 4 blocks per group
            groups.append(nn.Sequential(*blocks))
            inplanes = planes
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU()
        self.pool = _SpatialMean()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1.0)
                nn.init.constant_(m.bias, 0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.relu(self.bn(self.groups(self.conv1(x)))))


class WRN28(nn.Module):
    """``WRN28(output_size, hidden_size=640, dropout=0.0)``: WRN-28-10 and a Linear head.
    The features are the mean over the last map (learn2learn's average pool over it)."""

    def __init__(self, output_size: int, hidden_size: int = 640, dropout: float = 0.0):
        super().__init__()
        if hidden_size % 64:
            raise ValueError(f"WRN28: hidden_size must be a multiple of 64 (64·widen factor), got {hidden_size}")
        self.features = WRN28Backbone(dropout=dropout, widen_factor=hidden_size // 64)
        self.classifier = nn.Linear(hidden_size, output_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def get_pretrained_backbone(*args, **kwargs):
    """Refused: learn2learn downloads pretrained weights; fastmeta never downloads."""
    raise NotImplementedError(
        "get_pretrained_backbone downloads weights, which fastmeta never does; load a state_dict yourself"
    )
