"""Pure domain logic: capacity math, the index and decisions. No I/O library is imported here."""
