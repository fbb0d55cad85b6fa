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


class UserError(RuntimeError):
    """A failure the user can fix (bad data, an interrupted data set, a diverged run): reported as one line."""


# Exceptions a command line reports as one `ERROR:` line instead of a traceback. The project raises
# ValueError (CheckpointError included) for bad arguments, data yamls and checkpoints, and OSError
# (FileNotFoundError, ConnectionError) for missing files, offline downloads and unopenable cameras;
# ImportError is a missing optional package. Anything else (TypeError, KeyError, torch's RuntimeError,
# ...) is a bug and keeps its traceback. YOLOV5KD_TRACEBACK=1 shows the traceback for these too.
USER_ERRORS = (UserError, ValueError, OSError, ImportError)


def error_line(e: BaseException) -> str:
    """The one-line report of a user error: its message with line breaks folded (the type if it has none)."""
    msg = " ".join(str(e).split())
    return f"ERROR: {msg or type(e).__name__}"


def cli_main(main, parse_opt):
    """Run main(parse_opt()) as a command: a user error prints one line on stderr and exits with 1."""
    opt = parse_opt()
    try:
        return main(opt)
    except USER_ERRORS as e:
        if os.getenv("YOLOV5KD_TRACEBACK"):
            raise
        print(error_line(e), file=sys.stderr, flush=True)
        sys.exit(1)
