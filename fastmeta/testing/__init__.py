"""Test and benchmark oracles: code that checks the engine, not part of it.

- :mod:`fastmeta.testing.reference_loop`: the reference loop, plain autograd task by task,
  that the tests and ``fastmeta bench`` compare the engine against.

Nothing in the product imports this package except :mod:`fastmeta.tools` (``fastmeta
bench``); it sits beside the tools, above the learners, and may import engine, ops and
learners. The C++ extension's build key reads csrc/ only, so nothing here is ever part of
it.
"""
