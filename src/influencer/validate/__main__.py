"""``python -m influencer.validate experiment|lds …``: the same commands as ``influencer validate``."""

from influencer.cli.validate import main

raise SystemExit(main())
