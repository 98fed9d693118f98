"""One exception for every mistake a user can fix, and one way to report it."""

import signal
import sys
import threading


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do. Printed as one line."""


def flag(name: str) -> str:
    """The command-line flag of a knob, without its dashes: train_blocks -> train-blocks."""
    return name.replace("_", "-")


def message_of(error: BaseException) -> str:
    """The user-facing line of an error, also when it crossed a DataLoader worker.

    DataLoader re-raises a worker's exception with the worker's traceback as its
    message; the line the user needs is the last one, after "UserError: ".
    """
    text = str(error).strip()
    if "Traceback (most recent call last)" in text:
        text = text.splitlines()[-1].split("UserError: ", 1)[-1]
    return text


def printable(text: str) -> str:
    """A file name that is not valid UTF-8 reaches us with surrogates, which print() refuses: show them escaped."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def run_cli(main, argv=None) -> None:
    """Run an entry point; a UserError becomes one line on stderr and exit status 2."""
    if threading.current_thread() is threading.main_thread():  # Ctrl-C is KeyboardInterrupt again, as main expects
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main(argv)
    except UserError as error:
        print(f"error: {printable(message_of(error))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
