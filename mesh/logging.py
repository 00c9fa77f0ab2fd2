"""Structured logging for every process of the mesh: JSON when not on a terminal, context variables
(job_id, consumer, request_id) merged into every line."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog


def configure_logging(service: str, *, level: str | None = None) -> None:
    """Sets up structlog for `service`; call once at process start."""
    level_name = (level or os.environ.get("C2D_LOG_LEVEL", "info")).upper()
    renderer: Any
    if sys.stderr.isatty() and os.environ.get("C2D_LOG_FORMAT", "") != "json":
        renderer = structlog.dev.ConsoleRenderer(colors=True)
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level_name, logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
