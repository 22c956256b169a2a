"""What a quality result read from a drop file carries whatever its format (its source and timestamp),
and how refusal messages quote the values they name."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from drivers.sdk import DataError, iso

# How much of an offending value a message quotes: enough to find it, never a whole file.
SHOW_CHARS = 40


def show(text: str) -> str:
    """A value as a message quotes it, cut to SHOW_CHARS."""
    return repr(text if len(text) <= SHOW_CHARS else text[:SHOW_CHARS] + "...")


def file_timestamp(mtime_ns: int) -> str:
    """A file's modification time as the contract's UTC timestamp with milliseconds."""
    # Integer arithmetic: a float of nanoseconds since 1970 can round .9995 s up into the next second.
    seconds, ns = divmod(mtime_ns, 1_000_000_000)
    return iso(datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=ns // 1000))


def file_time(name: str, mtime_ns: int) -> str:
    """`file_timestamp`, refused with a DataError naming the file when the time is not a usable date."""
    try:
        return file_timestamp(mtime_ns)
    except (ValueError, OverflowError, OSError):
        raise DataError(f"{name}: the file's modification time ({mtime_ns} ns) is not a usable date") from None


def source_of(name: str) -> str:
    """The `source` of a result read from the file called `name`."""
    # A name that is not UTF-8 reaches Python with surrogate escapes, which no JSON body can carry.
    return "file_drop:" + name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
