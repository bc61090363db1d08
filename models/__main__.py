"""``python -m models``: the main job (see ``models.demo``)."""

import sys

from models.demo import main

sys.exit(main())
