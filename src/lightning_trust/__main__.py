import sys

from lightning_trust.cli import main

sys.exit(main())
