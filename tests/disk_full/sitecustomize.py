"""A full disk for the real CLI in a subprocess: put this folder on PYTHONPATH and every
``shutil.disk_usage`` in that process reports 1 KiB free (the export's free-space check must refuse
before it writes anything). Test-only: nothing in the package knows this folder."""

import shutil
from collections import namedtuple

_usage = namedtuple("usage", "total used free")


def _full(path):
    return _usage(1 << 30, (1 << 30) - 1024, 1024)


shutil.disk_usage = _full
