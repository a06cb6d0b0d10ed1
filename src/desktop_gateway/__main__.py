import sys

from desktop_gateway.cli import main

sys.exit(main())
