"""Pigeon's wire protocol, with no I/O: frames, error and close codes, the session state machine."""
