"""``python -m influencer.validate {experiment,lds} …`` (see :mod:`influencer.validate.cli`)."""

from influencer.validate.cli import main

raise SystemExit(main())
