"""``python -m lafn_hf.cli``: what ``torchrun -m lafn_hf.cli edit ...`` runs."""

from . import main

raise SystemExit(main())
