"""Errors the public API raises (besides ValueError for bad input)."""


class EngineDeadError(RuntimeError):
    """The engine or one of its workers died; pending and later requests fail with this."""


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (max_waiting_requests); try again later."""


class EngineNotRunningError(RuntimeError):
    """generate() was called before start() or after shutdown()."""
