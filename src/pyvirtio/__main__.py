import sys

from pyvirtio.cli import main

sys.exit(main())
