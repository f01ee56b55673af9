"""Errors of bad input to the data pipeline (a file, a dataset, a tokenizer, an option).

Their message names what is wrong and where, and says how to fix it; the command-line tools print it
on one line and exit with code 2. Anything else raised is a bug and keeps its traceback.
"""


class DataError(ValueError):
    """Bad input: the message names the file / line / key and the fix."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A named input file, dataset or tokenizer does not exist."""


class DataFileExistsError(DataError, FileExistsError):
    """An output already exists (or is one of the inputs)."""
