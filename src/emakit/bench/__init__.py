"""The update benchmark behind ``emakit bench``: models, contenders, interleaved timing.

Needs torch (and the peer libraries it compares against, when installed); nothing here is
imported by ``import emakit``.
"""
