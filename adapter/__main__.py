"""``python -m adapter`` is ``fastchat-adapter``."""

import sys

from adapter.cli import main

sys.exit(main())
