"""One logger for the whole project, and the small console helpers that go with it."""
import logging
import os
import sys

LOGGER_NAME = "yolov5kd"


def rank() -> int:
    """Global rank under torchrun (-1 when not distributed)."""
    return int(os.getenv("RANK", -1))


def set_logging(name: str = LOGGER_NAME, verbose: bool = True) -> logging.Logger:
    """Configure the project logger once: INFO on rank 0 (or single process), WARNING on other ranks."""
    level = logging.INFO if verbose and rank() in (-1, 0) else logging.WARNING
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    return logger


LOGGER = set_logging()

_COLORS = {
    "black": "\033[30m", "red": "\033[31m", "green": "\033[32m", "yellow": "\033[33m", "blue": "\033[34m",
    "magenta": "\033[35m", "cyan": "\033[36m", "white": "\033[37m", "bold": "\033[1m", "underline": "\033[4m",
    "end": "\033[0m",
}


def colorstr(*args: str) -> str:
    """colorstr('blue', 'bold', 'text') -> text wrapped in ANSI codes; plain text when not on a terminal."""
    *styles, text = args if len(args) > 1 else ("blue", "bold", args[0])
    if not sys.stdout.isatty() or os.getenv("NO_COLOR"):
        return str(text)
    return "".join(_COLORS[s] for s in styles) + f"{text}" + _COLORS["end"]
