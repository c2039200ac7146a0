"""The zoom server: an OpenAI-compatible endpoint that puts a zoom policy in front of any VLM.

``zoomvlm serve --target SPEC --policy SPEC`` (local mode) or ``zoomvlm serve --upstream URL --policy SPEC``
(proxy mode). See ``docs/serve.md`` for every limit, header and metric.
"""

from zoomvlm.serve.config import ServeConfig

__all__ = ["ServeConfig"]
