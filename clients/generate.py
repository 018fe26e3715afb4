"""Stream a completion from an ortserve text-generation model to the terminal as it arrives.

Examples:
    python clients/generate.py "def fibonacci(n):"
    python clients/generate.py --temperature 0.8 --top-k 40 --seed 1 --max-tokens 120 "import "
    python clients/generate.py --stop "\\n\\n" "class Stack:"

A thin wrapper: the client is the stand-alone package in clients/python (`pip install clients/python`, then
`python -m ortserve_client.generate`). Run from a checkout, it uses that package's code without installing it.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The checkout's package first, so that this script always runs the code next to it.
sys.path.insert(0, str(Path(__file__).resolve().parent / "python"))

from ortserve_client.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
