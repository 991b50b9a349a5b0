"""``python -m auto_quantize_model.cli``."""

import sys

from auto_quantize_model.cli import main

sys.exit(main())
