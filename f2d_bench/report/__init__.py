"""Reports of a scored run: tables and figures."""
