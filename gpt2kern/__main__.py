"""python -m gpt2kern ... — the same as the `gpt2kern` console script."""
import sys

from .cli.main import main

sys.exit(main())
