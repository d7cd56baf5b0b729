"""Minimal scripts of the same shape as learn2learn's examples, with ``import fastmeta.l2l
as l2l`` in place of ``import learn2learn as l2l``. Each lists, in ``L2L_CALLS``, the
original's learn2learn calls in the order it makes them; tests/l2l/test_l2l_examples.py
runs each on tiny data and checks that every listed call ran, in that order."""
