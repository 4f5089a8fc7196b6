"""`python -m copilink_rules` is the same as `copilink-rules`."""

from .cli import main

main()
