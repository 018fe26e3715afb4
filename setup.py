"""Builds the one C extension (server.core._sampling); everything else is in pyproject.toml.

The extension is optional: without a C compiler the install still succeeds and the
server samples with numpy instead (same tokens, about 150 us more per decode step).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("server.core._sampling", ["server/core/_sampling.c"], optional=True),
    ],
)
