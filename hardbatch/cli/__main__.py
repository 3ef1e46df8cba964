"""`python -m hardbatch.cli` runs the `hardbatch` command (how a driver starts its service)."""

from hardbatch.cli import main

main()
