"""Runtimes that host fedenc's Flower apps (``nodes/master.py``, ``nodes/child.py``).

* :mod:`fedenc.runtime.inprocess`: an in-memory Flower ``Grid`` that runs every virtual child's
  ClientApp in this process (the default of ``fedenc simulate``);
* :mod:`fedenc.runtime.flower_compat`: the only module that touches Flower internals.

Nothing is imported here, so importing the package stays cheap.
"""
