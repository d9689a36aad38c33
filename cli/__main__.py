"""`python -m cli` is the `mailpipe` command."""

import sys

from cli.main import main

sys.exit(main())
