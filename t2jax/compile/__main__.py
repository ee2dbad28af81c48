"""`python -m t2jax.compile`: see t2jax/compile/__init__.py."""

import sys

from t2jax.compile.cli import main

sys.exit(main())
