"""``python -m advtrain``: the advtrain command line."""
import sys

from .cli import main

sys.exit(main())
