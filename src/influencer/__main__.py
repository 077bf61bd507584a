"""``python -m influencer``: the command line (see :mod:`influencer.cli`)."""

from influencer.cli import app

app(prog_name="influencer")
