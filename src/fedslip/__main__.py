import sys

from fedslip.cli import main

sys.exit(main())
