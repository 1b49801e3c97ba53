"""Builds the native engine (Cython + a small C header) with the package."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

NATIVE = "src/evpl/_native"
CFLAGS = ["-O2", "-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
if os.environ.get("EVPL_ASAN"):
    CFLAGS += ["-fsanitize=address", "-fno-omit-frame-pointer", "-O1", "-g"]
LDFLAGS = ["-fsanitize=address"] if os.environ.get("EVPL_ASAN") else []


def ext(name: str) -> Extension:
    return Extension(
        f"evpl._native.{name}",
        [f"{NATIVE}/{name}.pyx"],
        include_dirs=[NATIVE],
        extra_compile_args=CFLAGS,
        extra_link_args=LDFLAGS,
    )


setup(
    ext_modules=cythonize(
        [ext("buffers"), ext("engine")],
        compiler_directives={"language_level": "3", "embedsignature": True},
        include_path=["src"],
    ),
)
