import sys

from pudding.cli import main

sys.exit(main())
