"""Counting XLA compilations (``jax_log_compiles``): what a test asserts when "nothing recompiles" must cover more
than one program's traces."""

import contextlib
import logging

import jax


@contextlib.contextmanager
def count_compiles():
    """``with count_compiles() as names: ...`` -> ``names`` lists every program compiled inside the block."""
    names: list[str] = []

    class _Handler(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("Compiling "):
                names.append(message.split(" with ")[0].removeprefix("Compiling "))

    handler, logger = _Handler(level=logging.DEBUG), logging.getLogger("jax")
    previous = jax.config.jax_log_compiles
    logger.addHandler(handler)
    jax.config.update("jax_log_compiles", True)
    try:
        yield names
    finally:
        jax.config.update("jax_log_compiles", previous)
        logger.removeHandler(handler)
