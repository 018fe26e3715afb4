"""Send one input to any Open Inference Protocol (KServe v2) gRPC server and print the outputs.

Examples:
    python clients/predict.py                                   # the bundled digit 7 to `digits`
    python clients/predict.py --image clients/samples/digit_3.png --top-k 3
    python clients/predict.py --model my_model --npy input.npy
    python clients/predict.py --model my_model --json '{"x": [[1, 2, 3]]}'

A thin wrapper: the client is the stand-alone package in clients/python (`pip install clients/python`, then
`python -m ortserve_client.predict`). Run from a checkout, it uses that package's code without installing it.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The checkout's package first, so that this script always runs the code next to it.
sys.path.insert(0, str(Path(__file__).resolve().parent / "python"))

from ortserve_client.predict import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
