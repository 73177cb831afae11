"""Scheduled jobs (APScheduler, in-process)."""

from __future__ import annotations

import datetime as dt
import logging

from apscheduler.schedulers.background import BackgroundScheduler

from server.config import Settings
from server.payments import PaymentRules

log = logging.getLogger(__name__)


def start(settings: Settings, rules: PaymentRules) -> BackgroundScheduler:
    scheduler = BackgroundScheduler(timezone=dt.timezone.utc)
    scheduler.add_job(lambda: rules.expire_due(rules.clock(), limit=settings.job_batch_size), "interval",
                      seconds=settings.expire_interval_seconds, id="expire", coalesce=True, max_instances=1)
    scheduler.start()
    return scheduler
