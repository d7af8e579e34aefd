"""`python -m fibecfed` is the `fibecfed` command."""

import sys

from fibecfed.cli import main

sys.exit(main())
