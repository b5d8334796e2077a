"""``python -m flowplug`` runs the command line."""

import sys

from flowplug.cli import main

sys.exit(main())
