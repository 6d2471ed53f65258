"""Hugging Face Hub upload of the release folder, as a Dagster resource.

The token comes from $HF_TOKEN or the store of `hf auth login` (`huggingface_hub.get_token()`)
at upload time and goes to `HfApi` only. It never reaches a
log line, metadata, the card or an exception: every message built from an upstream error is
scrubbed, and the final error does not chain the original exception (whose text and
traceback could carry request details).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
from huggingface_hub import HfApi, get_token

from bitmar_pipeline.config import HubConfig

HF_TOKEN_ENV = "HF_TOKEN"
REDACTED = "***"
# Client errors a retry cannot fix (bad token, no permission, bad repo id); 408 and 429 can.
_RETRYABLE_CLIENT_STATUS = frozenset({408, 429})

Log = Callable[[str], None]


class HubUploadError(RuntimeError):
    """The upload failed for good; the message says where, how often and why (token scrubbed)."""


@dataclass(frozen=True)
class UploadOutcome:
    repo_id: str
    uploaded: bool
    commit_url: str | None = None
    skipped_reason: str | None = None
    attempts: int = 0

    def metadata(self) -> dict[str, str | int | dg.MetadataValue]:
        if not self.uploaded:
            return {"hub_upload": f"skipped: {self.skipped_reason}", "hub_repo_id": self.repo_id}
        return {
            "hub_upload": "uploaded",
            "hub_repo_id": self.repo_id,
            "hub_commit_url": dg.MetadataValue.url(str(self.commit_url)),
            "hub_attempts": self.attempts,
        }


def scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, REDACTED) if secret else text


def commit_message(template: str, step: int | None, when: datetime | None = None) -> str:
    """The configured commit message with {step} and {timestamp} (UTC, ISO 8601) filled in."""
    timestamp = (when or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    try:
        return template.format(step=step, timestamp=timestamp)
    except (KeyError, IndexError, ValueError) as exc:
        raise HubUploadError(
            f"huggingface_hub.commit_message {template!r}: only {{step}} and {{timestamp}} can be filled in ({exc!r})"
        ) from None


def _retryable(exc: Exception) -> bool:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return not (isinstance(status, int) and 400 <= status < 500 and status not in _RETRYABLE_CLIENT_STATUS)


class HuggingFaceHubResource(dg.ConfigurableResource):
    """Uploads a folder to the Hub repo of the `huggingface_hub` config section.

    `endpoint` None means huggingface_hub's default ($HF_ENDPOINT or https://huggingface.co).
    Transient failures (network, 5xx, 408, 429) are retried up to `max_attempts` times with
    exponential backoff (backoff_seconds, 2x, 4x, ...); other client errors fail at once. This is
    the one retry layer of an upload: hub_release has no step retry policy on top of it.
    """

    endpoint: str | None = None
    max_attempts: int = 4
    backoff_seconds: float = 2.0

    def publish(self, folder: Path, config: HubConfig, step: int | None, log: Log | None = None) -> UploadOutcome:
        """Upload `folder`, or skip (saying why) when the upload is disabled or has no token."""
        if not config.enabled:
            return UploadOutcome(config.repo_id, False, skipped_reason="huggingface_hub.enabled is false")
        # $HF_TOKEN, else the token `hf auth login` stored (huggingface_hub's own lookup).
        token = get_token()
        if not token:
            reason = f"no Hugging Face token: set {HF_TOKEN_ENV} or run `hf auth login`"
            return UploadOutcome(config.repo_id, False, skipped_reason=reason)
        message = commit_message(config.commit_message, step)
        api = HfApi(endpoint=self.endpoint, token=token)
        attempts = max(1, self.max_attempts)
        attempt = 0
        while True:
            attempt += 1
            try:
                api.create_repo(config.repo_id, private=config.private, exist_ok=True)
                info = api.upload_folder(repo_id=config.repo_id, folder_path=str(folder), commit_message=message)
                return UploadOutcome(config.repo_id, True, commit_url=info.commit_url, attempts=attempt)
            except Exception as exc:  # any failure: reported below, scrubbed, never chained
                reason = scrub(f"{type(exc).__name__}: {exc}", token)
                if not _retryable(exc):
                    raise HubUploadError(
                        f"upload of {folder} to {config.repo_id} failed (not retried: {reason})"
                    ) from None
                if attempt >= attempts:
                    raise HubUploadError(
                        f"upload of {folder} to {config.repo_id} failed after {attempts} attempts; last error: {reason}"
                    ) from None
                delay = self.backoff_seconds * 2 ** (attempt - 1)
                if log is not None:
                    log(
                        f"upload attempt {attempt}/{attempts} to {config.repo_id} "
                        f"failed ({reason}); retrying in {delay:g}s"
                    )
                time.sleep(delay)
