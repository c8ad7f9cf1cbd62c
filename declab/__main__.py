import sys

from declab.cli import main

sys.exit(main())
