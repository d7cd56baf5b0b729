"""learn2learn's ``learn2learn.gym`` (MetaEnv, AsyncVectorEnv and the meta-RL
environments) builds on OpenAI gym, which fastmeta does not depend on."""

raise ImportError(
    "fastmeta.l2l.gym needs gym (pip install gym), which fastmeta does not depend on; "
    "the learners (l2l.algorithms.MAML, MetaSGD) work with any environment"
)
