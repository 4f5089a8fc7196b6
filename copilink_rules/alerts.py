"""Telling the trader: terminal, log file, and optional webhooks (Discord- or Telegram-style).

Webhooks are posted from a background thread with a short timeout: an unreachable webhook is
logged and dropped, never waited for, so enforcement never blocks on it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import httpx

log = logging.getLogger("copilink_rules.alerts")


@dataclass(frozen=True)
class Alert:
    time: datetime
    severity: str
    message: str
    account: str | None = None
    rule: str | None = None

    def line(self) -> str:
        stamp = self.time.strftime("%H:%M:%S")
        return f"{stamp} [{self.severity.upper()}] {self.message}"


@dataclass(frozen=True)
class Webhook:
    url: str
    style: Literal["discord", "telegram", "json"] = "json"
    chat_id: str | None = None  # telegram
    min_severity: Literal["info", "warning", "critical"] = "warning"


_RANK = {"info": 0, "warning": 1, "critical": 2, "error": 2}


def webhook_body(hook: Webhook, alert: Alert) -> dict[str, object]:
    text = alert.line()
    if hook.style == "discord":
        return {"content": text}
    if hook.style == "telegram":
        return {"chat_id": hook.chat_id, "text": text}
    return {"time": alert.time.isoformat(), "severity": alert.severity,
            "account": alert.account, "rule": alert.rule, "message": alert.message}


class Alerts:
    """Fan one alert out to every channel. `send` never blocks on the network."""

    def __init__(self, *, terminal: Callable[[Alert], None] | None = None,
                 log_file: str | Path | None = None, webhooks: list[Webhook] | None = None,
                 timeout: float = 5.0) -> None:
        self.terminal = terminal
        self.log_file = Path(log_file) if log_file else None
        self.webhooks = list(webhooks or [])
        self.timeout = timeout
        self.failures: list[str] = []
        self.sent: list[Alert] = []
        self._queue: queue.Queue[tuple[Webhook, Alert] | None] = queue.Queue(maxsize=1000)
        self._worker: threading.Thread | None = None
        if self.webhooks:
            self._worker = threading.Thread(target=self._post_loop, name="copilink-webhooks",
                                            daemon=True)
            self._worker.start()

    def send(self, alert: Alert) -> None:
        self.sent.append(alert)
        if self.terminal is not None:
            self.terminal(alert)
        if self.log_file is not None:
            try:
                with self.log_file.open("a", encoding="utf-8") as handle:
                    handle.write(f"{alert.time.isoformat()} {alert.severity} "
                                 f"{alert.account or '-'} {alert.message}\n")
            except OSError as exc:
                self.failures.append(f"log file {self.log_file}: {exc.strerror}")
        for hook in self.webhooks:
            if _RANK.get(alert.severity, 1) >= _RANK[hook.min_severity]:
                try:
                    self._queue.put_nowait((hook, alert))
                except queue.Full:
                    self.failures.append(f"webhook {hook.url}: queue full, alert dropped")

    def _post_loop(self) -> None:
        with httpx.Client(timeout=self.timeout) as client:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                hook, alert = item
                try:
                    response = client.post(hook.url, json=webhook_body(hook, alert))
                    if response.status_code >= 400:
                        self.failures.append(f"webhook {hook.url}: HTTP {response.status_code}")
                except httpx.HTTPError as exc:
                    self.failures.append(f"webhook {hook.url}: {type(exc).__name__}")
                    log.warning("webhook %s failed: %s", hook.url, exc)
                finally:
                    self._queue.task_done()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait (at most `timeout`) for queued webhooks: for tests and clean shutdown."""
        if self._worker is None:
            return
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        done.wait(timeout)

    def close(self) -> None:
        if self._worker is not None:
            self.flush(2.0)
            self._queue.put(None)
            self._worker.join(timeout=2.0)
            self._worker = None
