"""Prints the server's runtime dependencies from pyproject.toml, as a pip requirements file.

The container images install these in a layer of their own (it changes only when the
dependency spec does), then the code with `--no-deps`. `--onnxruntime cpu` swaps the GPU
build of ONNX Runtime for the CPU one (a CPU image need not carry CUDA libraries);
`gpu` keeps onnxruntime-gpu, whatever the platform markers say.

    python3 scripts/requirements.py --onnxruntime cpu > requirements.txt
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
ORT = re.compile(r"^onnxruntime(-gpu)?\b")


def requirements(onnxruntime: str) -> list[str]:
    """The runtime dependencies, with one ONNX Runtime build chosen."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    others = [d for d in dependencies if not ORT.match(d)]
    gpu = next(d for d in dependencies if d.startswith("onnxruntime-gpu"))
    specifier = gpu.split(";")[0][len("onnxruntime-gpu"):]  # the version range, without the platform marker
    name = "onnxruntime-gpu" if onnxruntime == "gpu" else "onnxruntime"
    return [*others, f"{name}{specifier}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnxruntime", choices=["cpu", "gpu"], default="gpu")
    args = parser.parse_args()
    sys.stdout.write("\n".join(requirements(args.onnxruntime)) + "\n")


if __name__ == "__main__":
    main()
