"""``python -m fedenc`` = the ``fedenc`` command (handy where the console script is not on PATH)."""

from fedenc.cli import main

main()
