"""Campaign rules: who a message goes to and what it says. Pure."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import ChainableUndefined, Template, TemplateSyntaxError, meta
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

CHANNELS = ("email",)
_CAMPAIGN_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_ADDRESS = re.compile(r"^[^@\s]+@[^@\s]+$")

# What one rendered message may hold: a subject line, and a body of at most 1 MiB.
MAX_SUBJECT_CHARS = 998
MAX_BODY_CHARS = 1024 * 1024


class _Sandbox(SandboxedEnvironment):
    """Jinja's sandbox, which also refuses `*` and `**` results too large to send (such as
    `{{ "x" * 10**9 }}`) before computing them."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(right, int | float) and abs(right) > 64 and isinstance(left, int | float) and abs(left) > 1:
                raise SecurityError(f"{left!r} ** {right!r} is too large")
            return super().call_binop(context, operator, left, right)
        for sized, times in ((left, right), (right, left)):
            if isinstance(sized, str | list | tuple) and isinstance(times, int) and len(sized) * times > MAX_BODY_CHARS:
                raise SecurityError(f"a repeated value of {len(sized)} x {times} is longer than {MAX_BODY_CHARS}")
        return super().call_binop(context, operator, left, right)


# Sandboxed: templates come from operators over gRPC and must not reach Python internals.
# A trait a profile lacks (nested ones too) renders as empty text rather than failing the send.
_ENV = _Sandbox(undefined=ChainableUndefined, autoescape=False)


@functools.lru_cache(maxsize=256)
def _template(source: str) -> Template:
    """A template compiled once (from_string compiles on every call: a tenth of activation's CPU
    in the whole suite, with every send rendering the same two)."""
    return _ENV.from_string(source)


class RenderFailed(Exception):
    """A campaign's template cannot be rendered for this profile (the reason names the field)."""


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
    """Subject and body for one profile; RenderFailed when this profile's data makes a template fail
    (an error in the template itself is refused by check_campaign)."""
    scope = {"traits": profile.get("traits", {}), "profile": profile}
    rendered = []
    for field, source, limit in (
        ("subject_template", campaign.subject_template, MAX_SUBJECT_CHARS),
        ("body_template", campaign.body_template, MAX_BODY_CHARS),
    ):
        try:
            text = _template(source).render(scope)
        except Exception as error:  # noqa: BLE001 - anything the template raises for this profile
            raise RenderFailed(f"{field}: {type(error).__name__}: {error}"[:500]) from None
        if len(text) > limit:
            raise RenderFailed(f"{field}: renders {len(text):,} characters, more than {limit:,}")
        rendered.append(text)
    subject, body = rendered
    # A header must stay on one line whatever the traits contain.
    return " ".join(subject.split()), body
