"""PII redaction: e-mail addresses, IPv4/IPv6 addresses and phone numbers become placeholders.

Regexes, as in datatrove's ``PIIFormatter`` and NeMo Curator's regex recognisers: cheap, no model,
and tuned to miss a little rather than to shred version numbers, times and code. Candidates for
IPv6 are confirmed with :mod:`ipaddress`, so ``12:30:45`` or ``a[::2]`` stay as written.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

EMAIL = "<EMAIL>"
IP_ADDRESS = "<IP_ADDRESS>"
PHONE = "<PHONE_NUMBER>"

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w.]|\.\d)")
_IPV6_CANDIDATE = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")
# +CC (area) 555-0100, 555.123.4567, +44 20 7946 0958 ...: groups joined by space, dot or dash.
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,3}(?![\w])"
)
_PHONE_DIGITS = (9, 15)  # E.164 numbers have at most 15 digits; fewer than 9 is a date or a count


def _ipv6(match: re.Match) -> str:
    text = match.group(0)
    groups = [g for g in text.split(":") if g]
    # Need real hex groups: 8 of them, or "::" compression with at least 3.
    if len(groups) < 3 or (len(groups) < 8 and "::" not in text):
        return text
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return text
    return IP_ADDRESS


def _phone(match: re.Match) -> str:
    text = match.group(0)
    digits = sum(c.isdigit() for c in text)
    if not (_PHONE_DIGITS[0] <= digits <= _PHONE_DIGITS[1]):
        return text
    # Space-separated digit groups without a +/( prefix are usually years or tables, not numbers.
    if text[0] not in "+(" and not re.search(r"\d[.-]\d", text):
        return text
    # "2019.10.22" style dates and "1.2.3" versions are not phone numbers.
    if re.fullmatch(r"\d{4}[.-]\d{1,2}[.-]\d{1,2}", text) or re.fullmatch(r"[\d.]+", text) and text.count(".") > 2:
        return text
    return PHONE


class PIIRedactor:
    """``redact(text) -> (text, counts)``; counts are per kind, for stats.json."""

    def redact(self, text: str) -> tuple[str, Counter]:
        counts: Counter = Counter()
        if "@" in text:
            text, n = _EMAIL.subn(EMAIL, text)
            counts["email"] += n
        if "." in text:
            text, n = _IPV4.subn(IP_ADDRESS, text)
            counts["ip"] += n
        if ":" in text:
            before = text.count(IP_ADDRESS)
            text = _IPV6_CANDIDATE.sub(_ipv6, text)
            counts["ip"] += text.count(IP_ADDRESS) - before
        before = text.count(PHONE)
        text = _PHONE.sub(_phone, text)
        counts["phone"] += text.count(PHONE) - before
        return text, +counts
