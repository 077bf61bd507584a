"""Paper §5.1 Fig. 6/7 on one setup: EK-FAC, K-FAC, LiSSA, gradient dot product (and exact damped GNH) against
the PBRF, with wall times. Results (table.md, PNG, JSON + safetensors) go to ``--out``; the PBRF pairs are
checkpointed there as they are solved, so an interrupted run resumes where it stopped. A thin wrapper of
``python -m influencer.validate experiment`` (:mod:`influencer.cli.validate`; results default to
``benchmarks/out/validate/<name>``).

    M=ekfac,kfac,diagonal,lissa,gradient-dot,exact,ekfac-pcg
    .venv/bin/python benchmarks/validate_experiment.py --setup concrete --size small   # smoke test, < 1 min
    .venv/bin/python benchmarks/validate_experiment.py --setup concrete --train-points 200 --methods $M  # recorded
    .venv/bin/python benchmarks/validate_experiment.py --setup digits --train-points 120 --pbrf-tol 3e-2 --methods $M
    .venv/bin/python benchmarks/validate_experiment.py --setup concrete --methods $M   # paper size 10 × 500, ~50 min

Recorded results: docs/VALIDATION.md.
"""

from __future__ import annotations

import sys

from influencer.cli.validate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python benchmarks/validate_experiment.py", command="experiment"))
