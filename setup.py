"""Builds the native engine (Cython + a small C header) with the package."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

NATIVE = "src/evpl/_native"
CFLAGS = ["-O2", "-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
if os.environ.get("EVPL_ASAN"):
    CFLAGS += ["-fsanitize=address", "-fno-omit-frame-pointer", "-O1", "-g"]
LDFLAGS = ["-fsanitize=address"] if os.environ.get("EVPL_ASAN") else []


def _liburing() -> tuple[list[tuple[str, str]], list[str]]:
    """Link liburing statically when its headers are installed (Debian's
    liburing-dev); without it the io_uring backends report themselves
    unavailable instead of failing the build."""
    for libdir in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib",
                   "/usr/local/lib"):
        static = os.path.join(libdir, "liburing.a")
        if os.path.exists("/usr/include/liburing.h") and os.path.exists(static):
            return [("EVPL_HAVE_LIBURING", "1")], [static]
    return [], []


URING_MACROS, URING_OBJECTS = _liburing()

# one module per concern (docs/engine.md): buffers, framing and the send
# queue, the loop core, the Bind/Listener bases, then one per I/O mechanism
MODULES = ["buffers", "framing", "txqueue", "loop", "bind", "epoll", "uring"]
MODULES += ["httphead"]


def ext(name: str) -> Extension:
    return Extension(
        f"evpl._native.{name}",
        [f"{NATIVE}/{name}.pyx"],
        include_dirs=[NATIVE],
        define_macros=URING_MACROS if name == "uring" else [],
        extra_objects=URING_OBJECTS if name == "uring" else [],
        extra_compile_args=CFLAGS,
        extra_link_args=LDFLAGS,
    )


setup(
    ext_modules=cythonize(
        [ext(name) for name in MODULES],
        compiler_directives={"language_level": "3", "embedsignature": True},
        include_path=["src"],
    ),
)
