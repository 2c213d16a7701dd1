import sys

from pixtok.cli import main

sys.exit(main())
