"""The EMA update of emakit and of every installed peer, against one flat pass (x flat).

The same as ``emakit bench`` (the code lives in ``emakit.bench`` so the installed command can run
it); results go to ``benchmarks/results/update-peers-<device>-<threads>threads-torch<version>``.

    python benchmarks/update_vs_peers.py [--quick] [--bf16] [--models ...] [--contenders ...]
"""

import sys

from emakit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
