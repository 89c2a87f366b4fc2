"""Versioned schema migrations, one directory per database."""
