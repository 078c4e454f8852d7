"""Campaign rules: who a message goes to and what it says. Pure."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import ChainableUndefined, TemplateSyntaxError, meta
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

CHANNELS = ("email",)
_CAMPAIGN_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_ADDRESS = re.compile(r"^[^@\s]+@[^@\s]+$")

# Sandboxed: templates come from operators over gRPC and must not reach Python internals.
# A trait a profile lacks (nested ones too) renders as empty text rather than failing the send.
_ENV = SandboxedEnvironment(undefined=ChainableUndefined, autoescape=False)


class InvalidCampaign(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field


@dataclass(frozen=True)
class Campaign:
    campaign_id: str
    segment_id: str
    channel: str
    from_address: str
    subject_template: str
    body_template: str


def check_campaign(campaign: Campaign) -> Campaign:
    if not _CAMPAIGN_ID.fullmatch(campaign.campaign_id):
        raise InvalidCampaign("id", "must be 1-63 lower-case letters, digits, '-' or '_'")
    if not campaign.segment_id:
        raise InvalidCampaign("segment_id", "is required")
    for field in ("segment_id", "from_address", "subject_template", "body_template"):
        if "\x00" in getattr(campaign, field):  # PostgreSQL text cannot hold it
            raise InvalidCampaign(field, "contains a NUL character")
    channel = campaign.channel or "email"
    if channel not in CHANNELS:
        raise InvalidCampaign("channel", f"unsupported channel {channel!r}; supported: {CHANNELS}")
    if not _ADDRESS.fullmatch(campaign.from_address):
        raise InvalidCampaign("from_address", "must be an email address")
    for field in ("subject_template", "body_template"):
        source = getattr(campaign, field)
        if not source.strip():
            raise InvalidCampaign(field, "is required")
        try:
            parsed = _ENV.parse(source)
        except TemplateSyntaxError as error:
            raise InvalidCampaign(field, f"template error on line {error.lineno}: {error.message}") from None
        except RecursionError:
            raise InvalidCampaign(field, "template nested too deeply") from None
        if any(True for _ in meta.find_referenced_templates(parsed)):
            raise InvalidCampaign(field, "include, import and extends are not available")
        # Rendered once for a profile without traits: endless recursion, a range over the
        # sandbox's limit or what the sandbox forbids would fail every send, each dead-lettered.
        # (What depends on traits is decided at send time.)
        try:
            _ENV.from_string(source).render({"traits": {}, "profile": {}})
        except (RecursionError, OverflowError, SecurityError) as error:
            raise InvalidCampaign(field, f"template fails for every profile: {error}") from None
        except Exception:  # noqa: BLE001, S110 - decided at send time, as above
            pass
    return Campaign(**{**campaign.__dict__, "channel": channel})


def recipient(traits: Mapping[str, Any], identifiers: Mapping[str, str]) -> str | None:
    """The profile's email address, if it has a usable one."""
    for candidate in (identifiers.get("email"), traits.get("email")):
        if isinstance(candidate, str) and _ADDRESS.fullmatch(candidate.strip()):
            return candidate.strip()
    return None


def render(campaign: Campaign, profile: Mapping[str, Any]) -> tuple[str, str]:
    scope = {"traits": profile.get("traits", {}), "profile": profile}
    subject = _ENV.from_string(campaign.subject_template).render(scope)
    body = _ENV.from_string(campaign.body_template).render(scope)
    # A header must stay on one line whatever the traits contain.
    return " ".join(subject.split()), body
