import sys

from crivm.cli import main

sys.exit(main())
