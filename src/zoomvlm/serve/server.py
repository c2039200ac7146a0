"""Start the zoom server: load the policy (and target) once, then run uvicorn with graceful draining."""

from __future__ import annotations

import logging
import os

from zoomvlm.serve.app import ZoomService, create_app
from zoomvlm.serve.config import ServeConfig

logger = logging.getLogger(__name__)

__all__ = ["build_service", "serve"]


def build_service(config: ServeConfig) -> ZoomService:
    """Validate ``config``, load its policy (and local target) and warm them up on a blank image.

    Keys come from the environment: ``ZOOMVLM_API_KEY`` (clients must send it; unset = open) and
    ``OPENAI_API_KEY`` (sent to the upstream in proxy mode).

    Raises:
        ValueError: a bad option or spec (see :meth:`ServeConfig.validate`, ``load_policy``, ``load_target``).
    """
    from PIL import Image

    from zoomvlm.core.geometry import Budget
    from zoomvlm.policies import load_policy
    from zoomvlm.targets import TargetRequest, load_target

    config.validate()
    policy = load_policy(config.policy)
    blank = Image.new("RGB", (64, 64), "white")
    policy.propose([blank], ["warm-up"])
    target = None
    if config.mode == "local":
        budget = Budget.parse(config.budget) if config.budget else None
        target = load_target(config.target, budget=budget)
        target.generate([TargetRequest((blank,), "warm-up")])
    return ZoomService(
        config,
        policy,
        target,
        api_key=os.environ.get("ZOOMVLM_API_KEY") or None,
        upstream_key=os.environ.get("OPENAI_API_KEY", ""),
    )


def serve(service: ZoomService) -> None:
    """Run the server until SIGINT/SIGTERM; in-flight requests get ``config.drain_timeout`` s to finish."""
    import uvicorn

    config = service.config
    app = create_app(service)

    class _DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):  # /ready answers 503 and new requests are refused while draining
            service.draining = True
            super().handle_exit(sig, frame)

    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=config.drain_timeout,
        lifespan="on",
    )
    _DrainingServer(uv_config).run()
