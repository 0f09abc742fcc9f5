"""Errors that stages report as one line (no traceback)."""


class WsssError(Exception):
    """Base class: a user-facing problem with input files or params."""


class ParamsError(WsssError):
    """A params.yaml key is unknown, mistyped or out of range."""


class DataError(WsssError):
    """A dataset file is missing, unreadable or inconsistent."""
