"""`python -m quantool` runs the command line, for machines where the console script is not on PATH."""

from quantool.cli import main

main()
