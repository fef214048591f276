"""graft.GraftError: every failure of the engine, and bad arguments caught before the call."""
from . import _lib


class GraftError(Exception):
    """A Graft call failed.

    Attributes:
        code: the graft_status (a negative GRAFT_ERR_* value, e.g. -1 invalid argument, -5 not found).
        name: the status's macro name without GRAFT_ ("ERR_INVALID_ARGUMENT"), from graft.h's status table.
        status: the status's short description ("invalid argument", "not found", ...).
        message: what was wrong, from graft_last_error() (or from the binding's own checks).
    """

    def __init__(self, code, message, where=None):
        self.code = int(code)
        self.status = _lib.lib.graft_status_string(self.code).decode()
        self.name = _lib.STATUS_NAMES.get(self.code, f"ERR_{self.code}")
        self.message = message
        self.where = where
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}{self.status} ({self.code}): {message}")


def check(status, where=None):
    """Raises GraftError for a failed status, carrying graft_last_error()'s message."""
    if status != _lib.OK:
        raise GraftError(status, _lib.lib.graft_last_error().decode("utf-8", "replace"), where)


def invalid(message, where=None):
    """A GraftError for an argument the binding rejects before calling the library."""
    return GraftError(_lib.ERR_INVALID_ARGUMENT, message, where)
