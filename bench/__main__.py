import sys

from .cli import main

# ``python -m flashmemory_triton.bench`` (installed) or ``python -m bench`` (repository root)
sys.exit(main(prog=f"python -m {__package__}"))
