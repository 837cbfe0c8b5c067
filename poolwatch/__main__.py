"""``python -m poolwatch`` runs the poolwatch command."""

import sys

from poolwatch.cli import main

sys.exit(main())
