"""Paper §5.1 Fig. 6/7 on one setup: EK-FAC, K-FAC, LiSSA, gradient dot product (and exact damped GNH) against
the PBRF, with wall times. Results (table.md, PNG, JSON + safetensors) go to ``--out``; the PBRF pairs are
checkpointed there as they are solved, so an interrupted run resumes where it stopped. A thin wrapper of
``python -m influencer.validate experiment`` (:mod:`influencer.validate.cli`).

    .venv/bin/python benchmarks/validate_experiment.py --setup concrete     # paper size 10 × 500: ~1 h (1 thread)
    .venv/bin/python benchmarks/validate_experiment.py --setup concrete --train-points 200 \\
        --methods ekfac,kfac,diagonal,lissa,gradient-dot,exact              # the recorded run, ~25 min
    .venv/bin/python benchmarks/validate_experiment.py --setup digits --train-points 80 --pbrf-tol 1e-2 \\
        --methods ekfac,kfac,diagonal,lissa,gradient-dot,exact              # the recorded run, ~25 min
    .venv/bin/python benchmarks/validate_experiment.py --setup concrete --size small   # smoke test, < 1 min

Recorded results: docs/VALIDATION.md.
"""

from __future__ import annotations

import sys

from influencer.validate.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", *sys.argv[1:]], prog="python benchmarks/validate_experiment.py"))
