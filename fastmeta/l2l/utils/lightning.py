"""learn2learn's ``learn2learn.utils.lightning`` (EpisodicBatcher and callbacks) wraps
PyTorch Lightning, which fastmeta does not depend on."""

raise ImportError(
    "fastmeta.l2l.utils.lightning needs PyTorch Lightning (pip install pytorch-lightning), "
    "which fastmeta does not depend on"
)
