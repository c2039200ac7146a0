"""Every option of ``zoomvlm serve``, one dataclass field each (default + help); the CLI is built from it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

__all__ = ["ServeConfig"]

MiB = 1024 * 1024


@dataclass
class ServeConfig:
    """Options of the zoom server. Units: bytes, pixels (width x height), seconds.

    Exactly one of ``target`` (local mode) and ``upstream`` (proxy mode) must be set.

    Raises:
        ValueError: from :meth:`validate`, saying which combination is refused and why.
    """

    # ---- what answers -----------------------------------------------------------------------
    target: str | None = field(
        default=None, metadata={"help": "local mode: the server answers with this target (ocr, hf:MODEL)"}
    )
    upstream: str | None = field(
        default=None,
        metadata={"help": "proxy mode: OpenAI-compatible endpoint root ending in /v1, e.g. http://127.0.0.1:8001/v1"},
    )
    upstream_model: str | None = field(
        default=None, metadata={"help": "proxy mode: replace the client's `model` field with this name"}
    )
    policy: str = field(default="vlm", metadata={"help": "zoom policy spec (none, center[:F], vlm, vlm:CKPT, ...)"})
    budget: str | None = field(
        default=None,
        metadata={
            "help": "budget of the global view: local mode: the target's own when unset; proxy mode: the user's "
            "image is replaced by its view shrunk to this (default 512; `native` forwards the user's image "
            "bytes unchanged)"
        },
    )
    crop_budget: str | None = field(default=None, metadata={"help": "budget of each crop. Default: --budget"})
    host: str = field(default="127.0.0.1", metadata={"help": "interface to listen on"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    # ---- hostile input ----------------------------------------------------------------------
    max_body_bytes: int = field(default=16 * MiB, metadata={"help": "largest request body (413 beyond)"})
    max_image_bytes: int = field(default=8 * MiB, metadata={"help": "largest encoded image (400 beyond)"})
    max_image_pixels: int = field(
        default=40_000_000,
        metadata={"help": "largest image, width x height, checked from its header before decoding (400 beyond)"},
    )
    max_request_pixels: int = field(
        default=64_000_000,
        metadata={"help": "largest total width x height over one request's images, checked from their headers "
                  "before decoding (400 beyond): bounds the memory one request holds"},
    )  # fmt: skip
    max_images: int = field(default=8, metadata={"help": "most images in one request (400 beyond)"})
    upstream_max_images: int | None = field(
        default=None,
        metadata={
            "type": int,
            "help": "proxy mode: most images the upstream accepts per request; crops beyond it are dropped "
            "(the user's images always go). Default: no limit",
        },
    )
    allowed_media_domains: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated hosts whose https image URLs may be fetched (public addresses only, "
            "redirects re-checked). Default: remote image URLs are refused"
        },
    )
    media_timeout: float = field(default=5.0, metadata={"help": "seconds to fetch one remote image"})
    body_timeout: float = field(
        default=30.0,
        metadata={
            "help": "seconds a client may take to send its request body; 408 beyond (a stalled upload would "
            "otherwise hold an admission slot for ever)"
        },
    )
    # ---- faults -----------------------------------------------------------------------------
    policy_timeout: float = field(default=10.0, metadata={"help": "seconds the zoom policy may take per request"})
    upstream_timeout: float = field(
        default=60.0,
        metadata={
            "help": "seconds per upstream attempt until its answer (streaming: until its headers, then "
            "between chunks); 504 beyond"
        },
    )
    upstream_retries: int = field(
        default=2, metadata={"help": "retries on connection errors, 429 and 5xx before anything was streamed"}
    )
    retry_backoff: float = field(default=0.5, metadata={"help": "first retry delay in seconds, doubled each retry"})
    max_retry_after: float = field(
        default=10.0, metadata={"help": "longest upstream Retry-After honoured, seconds (longer: give up at once)"}
    )
    on_policy_error: str = field(
        default="open",
        metadata={
            "choices": ("open", "fail"),
            "help": "open: a policy failure or timeout forwards the request without crops (counted); fail: answer 502",
        },
    )
    # ---- load -------------------------------------------------------------------------------
    max_concurrency: int = field(default=32, metadata={"help": "requests processed at once"})
    max_queue: int = field(
        default=64, metadata={"help": "requests waiting beyond --max-concurrency; more get 503 with Retry-After"}
    )
    max_batch: int = field(default=8, metadata={"help": "most requests per policy / local target call"})
    batch_wait_ms: float = field(default=5.0, metadata={"help": "how long a batch waits to fill, milliseconds"})
    drain_timeout: float = field(
        default=30.0, metadata={"help": "on SIGTERM/SIGINT: seconds in-flight requests may take to finish"}
    )

    @property
    def mode(self) -> str:
        """``"local"`` or ``"proxy"``."""
        return "proxy" if self.upstream else "local"

    def validate(self) -> None:
        """Refuse contradictory or impossible options.

        Raises:
            ValueError: naming the option and why.
        """
        if bool(self.target) == bool(self.upstream):
            raise ValueError("give exactly one of --target (local mode) and --upstream (proxy mode)")
        if self.upstream and not self.upstream.startswith(("http://", "https://")):
            raise ValueError(f"--upstream must be an http(s) URL ending in /v1, got {self.upstream!r}")
        if self.target and self.target.split(":")[0] == "openai":
            raise ValueError("--target openai:MODEL would call an endpoint from a thread; use --upstream URL instead")
        if self.upstream_model and not self.upstream:
            raise ValueError("--upstream-model needs --upstream")
        if self.policy.split(":")[0] == "oracle" or self.policy.startswith("crop-set-oracle"):
            raise ValueError("oracle policies need human evidence boxes; a server has none")
        if self.policy.split(":")[0].split("@")[0] in ("self-zoom", "attention"):
            # both read the target model's own internals (its tool call / its attention): not a region proposer
            # that can sit in front of an endpoint; use `zoomvlm eval --target hf:...` for them
            raise ValueError(
                f"--policy {self.policy} needs an hf: target's internals and is not served yet; "
                "use it with zoomvlm eval / ask --target hf:MODEL"
            )
        if self.on_policy_error not in ("open", "fail"):
            raise ValueError(f"--on-policy-error must be open or fail, got {self.on_policy_error!r}")
        for name in (
            "max_body_bytes",
            "max_image_bytes",
            "max_image_pixels",
            "max_request_pixels",
            "max_images",
            "max_concurrency",
            "max_batch",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_queue < 0 or self.upstream_retries < 0:
            raise ValueError("--max-queue and --upstream-retries must be >= 0")
        if self.upstream_max_images is not None and self.upstream_max_images < 1:
            raise ValueError("--upstream-max-images must be >= 1")
        if self.upstream_max_images is not None and self.mode != "proxy":
            raise ValueError("--upstream-max-images needs --upstream (proxy mode); a local target takes every crop")
        for name in ("media_timeout", "body_timeout", "policy_timeout", "upstream_timeout", "drain_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):  # 0 or less: every request would time out (or fail open)
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number of seconds > 0, got {value}")
        for name in ("batch_wait_ms", "retry_backoff", "max_retry_after"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.batch_wait_ms / 1000 >= self.policy_timeout:  # a lone request would wait out its policy timeout
            raise ValueError(
                f"--batch-wait-ms {self.batch_wait_ms:g} must be shorter than --policy-timeout "
                f"({self.policy_timeout:g} s): every request alone in its batch would fail open"
            )
        from zoomvlm.core.geometry import Budget
        from zoomvlm.targets import check_target_spec

        if self.target:  # before the policy loads (minutes for a large one)
            check_target_spec(self.target)
        for name in ("budget", "crop_budget"):
            if getattr(self, name) is not None:
                try:
                    Budget.parse(getattr(self, name))
                except ValueError as e:
                    raise ValueError(f"--{name.replace('_', '-')}: {e}") from e

    @property
    def allowed_domains(self) -> tuple[str, ...]:
        """``--allowed-media-domains`` as lower-case host names (empty: every remote URL refused)."""
        if not self.allowed_media_domains:
            return ()
        return tuple(h.strip().lower().rstrip(".") for h in self.allowed_media_domains.split(",") if h.strip())

    @classmethod
    def add_arguments(cls, parser) -> None:
        """Add one ``--option`` per field to an argparse parser (type from the default, help from metadata)."""
        for f in fields(cls):
            kind = f.metadata.get("type") or {int: int, float: float}.get(type(f.default), str)
            default = f" (default {f.default})" if f.default is not None else ""
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                type=kind,
                default=f.default,
                choices=f.metadata.get("choices"),
                help=f.metadata["help"] + default,
            )

    @classmethod
    def from_namespace(cls, args) -> ServeConfig:
        """The config from parsed arguments (fields by name; anything else in ``args`` is ignored)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
