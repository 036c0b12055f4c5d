"""Quality benchmark on the trained proxy: ``python benchmarks/quality.py [options]`` is ``vdopt-bench quality``.

The committed results (benchmarks/results/quality.json, quality_pareto.png, quality_recall95.json) come from
``python benchmarks/quality.py --out benchmarks/results`` on one GPU; see ``--help`` for the options.
"""

from __future__ import annotations

import sys

from vdopt.quality import quality_main

if __name__ == "__main__":
    sys.exit(quality_main(sys.argv[1:]))
