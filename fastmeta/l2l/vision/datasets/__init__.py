"""learn2learn's ``learn2learn.vision.datasets``, reading published files from a local
folder. Nothing is downloaded: ``download=True`` is refused, and a missing file raises a
one-line FileNotFoundError saying which file to put where.

- :class:`FullOmniglot`: the official ``images_background.zip`` and
  ``images_evaluation.zip`` (read by :class:`fastmeta.data.Omniglot`);
- :class:`MiniImagenet`: ``mini-imagenet-cache-{train,validation,test}.pkl``;
- :class:`FC100`: ``FC100_{train,val,test}.pickle``;
- :class:`CIFARFS`: ``cifarfs/cifar100/data/<class>/*.png`` with the split lists
  ``cifarfs/cifar100/splits/bertinetto/{train,val,test}.txt`` (or learn2learn's processed
  ``cifarfs/processed/{train,val,test}/<class>/*.png``).

Pickles load through a restricted unpickler (``published_files``). The other datasets
learn2learn lists (tiered-ImageNet, VGG Flowers, FGVC Aircraft and Fungi, CUB-200,
Quickdraw, Describable Textures) are refused by name.
"""

from .readers import (
    CIFARFS,
    FC100,
    CUBirds200,
    DescribableTextures,
    FGVCAircraft,
    FGVCFungi,
    FullOmniglot,
    MiniImagenet,
    Quickdraw,
    TieredImagenet,
    VGGFlower102,
)

__all__ = [
    "CIFARFS", "CUBirds200", "DescribableTextures", "FC100", "FGVCAircraft", "FGVCFungi", "FullOmniglot",
    "MiniImagenet", "Quickdraw", "TieredImagenet", "VGGFlower102",
]
