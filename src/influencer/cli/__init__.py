"""The ``influencer`` command line: fit, scan, probe, report, plan, demo, validate.

    influencer fit smollm2-135m kjv --sequences 256 --out runs/kjv
    influencer scan runs/kjv --prompt "In the beginning God created" --completion " the heaven and the earth."
    influencer report runs/kjv

Every error the user can cause prints one line ``error: ...`` and exits with status 1 (2 for a bad command
line); ``--debug`` shows the traceback instead. Nothing is written before the inputs have been checked, and
run directories are only ever replaced atomically (see :mod:`influencer.runs`).

Under torchrun (``torchrun --standalone --nproc-per-node K -m influencer fit|scan …``) every process joins the
group (gloo on the CPU, NCCL on ``cuda:LOCAL_RANK``) and does its share; rank 0 alone checks and writes the run
directory and prints. Checks and loading run on every rank before the collective work and a failure on any rank
ends them all, with one ``error: ...`` line from rank 0.
"""

from influencer.cli._app import app

# the commands register themselves on ``app``; imported in the order --help lists them
from influencer.cli import fit, scan, probe, report, plan, demo, validate  # noqa: F401  isort: skip

__all__ = ["app"]
