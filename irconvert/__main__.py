"""`python -m irconvert` (also what torchrun runs)."""

from .cli import main

main()
