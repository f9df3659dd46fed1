import sys

from aiosched.cli import main

sys.exit(main())
