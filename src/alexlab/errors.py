"""One exception type for bad user input: the entry points turn it into one clear line and exit 2."""


class ConfigError(ValueError):
    pass
