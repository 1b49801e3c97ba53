"""The evpl core API (Python face of the native engine)."""
