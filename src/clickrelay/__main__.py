import sys

from clickrelay.cli import main

sys.exit(main())
