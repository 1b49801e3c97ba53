"""Fixtures for the HTTP tests (tests/httpd: ``http`` would shadow the
standard library's package)."""

from httpd.support import serve  # noqa: F401  (the fixture)
