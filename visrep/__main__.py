import sys

from visrep.cli import main

sys.exit(main())
