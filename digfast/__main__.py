import sys

from digfast.cli import main

sys.exit(main())
