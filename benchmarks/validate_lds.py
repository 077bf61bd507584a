"""Linear datamodeling score (LDS) of identity, diagonal, K-FAC, EK-FAC (and exact damped GNH) on one setup.
A thin wrapper of ``python -m influencer.validate lds`` (:mod:`influencer.cli.validate`; results default to
``benchmarks/out/validate/<name>``).

    .venv/bin/python benchmarks/validate_lds.py --setup concrete --strategies identity,diagonal,kfac,ekfac,exact
    .venv/bin/python benchmarks/validate_lds.py --setup digits
    .venv/bin/python benchmarks/validate_lds.py --setup concrete --damping-factor 1   # one global λ

Retrained measurements are checkpointed in ``--out`` (resumable). Recorded results: docs/VALIDATION.md.
"""

from __future__ import annotations

import sys

from influencer.cli.validate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python benchmarks/validate_lds.py", command="lds"))
