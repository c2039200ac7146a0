"""Integrations with other tools: the lmms-eval model plugin (:mod:`~zoomvlm.integrations.lmms_eval`)."""
