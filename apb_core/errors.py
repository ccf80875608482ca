"""Errors that reach the user as one line (exit code 2 for bad input, 1 for run failures)."""


class ApbError(Exception):
    """A failure the user should see as one clear line, never a traceback."""

    exit_code = 1


class InputError(ApbError):
    """Bad input from the user (path, document, option, model): exit code 2, nothing is written."""

    exit_code = 2


class WorkerError(ApbError):
    """A worker process failed; the message names the rank and the cause."""

    exit_code = 1
