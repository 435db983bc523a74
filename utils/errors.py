"""Exception types with messages that name the file, key or value at fault."""


class ConfigError(ValueError):
    """A config file, key or value is missing, unknown or of the wrong type."""


class DataError(ValueError):
    """A data file is missing, truncated, malformed, or holds values out of range."""


class CheckpointError(RuntimeError):
    """A checkpoint does not match the model it is loaded into."""
