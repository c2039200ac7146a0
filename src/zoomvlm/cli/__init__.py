"""The ``zoomvlm`` command line (:func:`main`); ``python -m zoomvlm.cli`` runs it too."""

from zoomvlm.cli.main import main

__all__ = ["main"]
