"""One exception type for bad user input: the entry points turn it into one clear line and exit 2.
The checks every config key shares (an integer in range, a number in range) live here too."""
import math


class ConfigError(ValueError):
    pass


def require_integer(key: str, value, least: int, most: int | None = None, null_means: str = "") -> None:
    """value is an int (not a bool) from least to most; None too where null_means says what null means."""
    if value is None and null_means:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < least or (most is not None and value > most):
        wanted = (f"an integer from {least} to {most}" if most is not None
                  else "a positive integer" if least == 1 else f"an integer >= {least}")
        raise ConfigError(f"{key} must be {wanted}{f' or null ({null_means})' if null_means else ''}, got {value!r}")


def first_line(err: BaseException) -> str:
    """The first line of an exception's message ("" for none): libraries' messages (OmegaConf's, W&B's)
    go on with lines of detail that would break an `error: ...` line."""
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def require_number(key: str, value, wanted: str, ok) -> None:
    """value is a finite int or float (not a bool) for which ok(value) holds; `wanted` says which, for the
    message. (optim.lr=inf passed `> 0`, trained on NaN and was marked completed.)"""
    if not is_number(value) or not _finite(value) or not ok(value):
        raise ConfigError(f"{key} must be {wanted}, got {value!r}")


def is_number(value) -> bool:
    """An int or a float, not a bool (True is an int to Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past a float's range (10**400)
        return False
