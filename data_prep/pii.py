"""PII redaction: e-mail addresses, personal IP addresses and valid phone numbers become placeholders.

Phone numbers are judged by libphonenumber (the ``phonenumbers`` port): a cheap regex finds runs of
digits written like a number, and only those are parsed and kept when valid, in their own country
(``+49 30 6489999``) or as a national number of one of the default regions (``049 2237 2272`` for
DE). IP addresses are judged by :mod:`ipaddress`: only globally routable ones can point at a
person, so private, loopback, link-local, reserved and documentation ranges stay as written. Dates,
times, UUIDs, hex ids, versions and section numbers are never rewritten (tests/test_pii.py).
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable

import phonenumbers

PII_ENTITIES = ("email", "ip", "phone")
EMAIL = "<EMAIL>"
IP_ADDRESS = "<IP_ADDRESS>"
PHONE = "<PHONE_NUMBER>"

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Not followed by a package revision ("(3.38.2.1-2)", "1.2.3.4+dfsg") nor a prefix length or mask: a
# network ("130.155.0.0/16") is nobody's address.
_IPV4 = re.compile(rf"(?=\d)(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|[.\-+~]\w|/\d)")
_IPV6_CANDIDATE = re.compile(r"(?=[0-9A-Fa-f:])(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:]|/\d)")
# "version 4.19.0.1", "release 2.6.32.71": four numbers after such a word are a version, not a host.
_VERSION_BEFORE = re.compile(r"(?i)\b(?:v|ver|version|release|rev|revision|build|kernel|linux)[.:]?\s*$")

# A run of digit groups joined by at most three of space, dot, dash, slash or brackets, optionally
# led by + or ( ("Tel:+49 ..."); never inside a word, path, version, time ("16:39:05 2018 -0700")
# or UUID, nor followed by more digits. Patterns here open with a lookahead for their first
# character so that re skips ahead to it instead of trying every position (twice as fast).
_SEPARATORS = r"[ \u00a0.\-/()]"
_PHONE_LEAD = r"(?:(?<![\w.+\-/])(?:\+|\(\+?)|(?<![\w.+\-/:]))"  # only +, ( or (+ may follow a colon
_PHONE_RUN = re.compile(
    rf"(?=[\d+(]){_PHONE_LEAD}\d(?:{_SEPARATORS}{{0,3}}\d){{7,20}}"
    rf"(?!\w|[.\-/:,]\w|{_SEPARATORS}{{1,3}}\d)"
)
_DIGIT_GROUP = re.compile(r"\d+")
_PHONE_DIGITS = (8, 15)  # fewer is a local number that cannot be validated; E.164 allows 15
_DATE = re.compile(
    r"(?:19|20)\d\d[-./](?:0?[1-9]|1[0-2])[-./](?:0?[1-9]|[12]\d|3[01])(?!\d)"
    r"|(?<!\d)(?:0?[1-9]|[12]\d|3[01])[-./](?:0?[1-9]|[12]\d|3[01])[-./](?:19|20)\d\d"
)
_DECIMAL = re.compile(r"(?<!\d)0\.\d|^\d+\.\d+$")
_ZIP_PLUS_4 = re.compile(r"\d{5}-\d{4}")  # "Boston, MA 02110-1301" in every GPL header
_NANP_GROUPS = ([3, 3, 4], [3, 7])  # (415) 555-0132, 415.555.0132, 415 5550132, after an optional 1


def _written_as_national(region: str) -> Callable[[list[str]], bool]:
    """Whether digit groups are written the way a national number of ``region`` is.

    NANP numbers are grouped 3-3-4 after an optional "1"; elsewhere a national number carries its
    trunk prefix: without it ("30 6489999" for DE) a digit run is more often a count or an id.
    """
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
    if metadata.country_code == 1:
        return lambda groups: [len(g) for g in (groups[1:] if groups[0] == "1" else groups)] in _NANP_GROUPS
    prefix = metadata.national_prefix or ""
    return lambda groups: groups[0].startswith(prefix)


def _substitute(pattern: re.Pattern, is_pii: Callable[[re.Match], bool], placeholder: str, text: str) -> tuple[str, int]:
    """``pattern.sub`` keeping the matches ``is_pii`` refuses; returns the text and the count replaced."""
    replaced = 0

    def replace(match: re.Match) -> str:
        nonlocal replaced
        if not is_pii(match):
            return match.group(0)
        replaced += 1
        return placeholder

    return pattern.sub(replace, text), replaced


def _is_host_on_internet(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # Multicast addresses name a group of listeners (224.0.0.251 is mDNS), never one machine.
    return address.is_global and not address.is_multicast


def _is_personal_ipv4(match: re.Match) -> bool:
    text = match.group(0)
    # Mostly single-digit octets are versions (1.2.3.4, 2.6.35.5); such hosts are public resolvers.
    if sum(len(octet) == 1 for octet in text.split(".")) >= 3:
        return False
    if _VERSION_BEFORE.search(match.string, max(0, match.start() - 16), match.start()):
        return False
    return _is_host_on_internet(ipaddress.IPv4Address(text))


def _is_personal_ipv6(match: re.Match) -> bool:
    text = match.group(0)
    groups = [g for g in text.split(":") if g]
    # Real hex groups: 8 of them, or "::" compression with at least 3 (not 12:30:45 or a[::2]).
    if len(groups) < 3 or (len(groups) < 8 and "::" not in text):
        return False
    try:
        return _is_host_on_internet(ipaddress.IPv6Address(text))
    except ValueError:
        return False


class PIIRedactor:
    """``redact(text) -> (text, counts)``; counts are per entity, for stats.json.

    ``entities`` is a subset of :data:`PII_ENTITIES`; ``phone_regions`` are ISO 3166 codes whose
    national numbers are recognised (the defaults live in the config's ``data.pii`` section).
    """

    def __init__(self, entities: Iterable[str], phone_regions: Iterable[str]):
        self.entities = frozenset(entities)
        unknown = sorted(self.entities - set(PII_ENTITIES))
        if unknown:
            raise ValueError(f"unknown PII entities {unknown}; known: {list(PII_ENTITIES)}")
        self.phone_regions = tuple(phone_regions)
        unsupported = sorted(set(self.phone_regions) - phonenumbers.SUPPORTED_REGIONS)
        if unsupported:
            raise ValueError(f"regions {unsupported} are not supported by phonenumbers (ISO 3166 codes such as US, DE)")
        self._national_shapes = {region: _written_as_national(region) for region in self.phone_regions}

    def redact(self, text: str) -> tuple[str, Counter]:
        counts: Counter = Counter()
        if "email" in self.entities and "@" in text:
            text, counts["email"] = _substitute(_EMAIL, lambda m: True, EMAIL, text)
        if "ip" in self.entities:
            if "." in text:
                text, counts["ip"] = _substitute(_IPV4, _is_personal_ipv4, IP_ADDRESS, text)
            if ":" in text:
                text, n = _substitute(_IPV6_CANDIDATE, _is_personal_ipv6, IP_ADDRESS, text)
                counts["ip"] += n
        if "phone" in self.entities:
            text, counts["phone"] = _substitute(_PHONE_RUN, self._is_phone_number, PHONE, text)
        return text, +counts

    def _is_phone_number(self, match: re.Match) -> bool:
        run = match.group(0)
        groups = _DIGIT_GROUP.findall(run)
        digits = "".join(groups)
        if not _PHONE_DIGITS[0] <= len(digits) <= _PHONE_DIGITS[1]:
            return False
        international = run.startswith(("+", "(+"))
        # Unseparated digits are ids, counters and timestamps (2147483647) unless led by +.
        if len(groups) == 1 and not international:
            return False
        # A one-digit last group is a check digit (ISBN 0-13-110362-7); many are a list of digits.
        if len(groups[-1]) == 1 or sum(len(g) == 1 for g in groups) > 2:
            return False
        if _DATE.search(run) or _DECIMAL.search(run) or _IPV4.fullmatch(run) or _ZIP_PLUS_4.fullmatch(run):
            return False
        if international:
            return self._valid(run, None)
        return any(shape(groups) and self._valid(run, region) for region, shape in self._national_shapes.items())

    @staticmethod
    def _valid(run: str, region: str | None) -> bool:
        try:
            return phonenumbers.is_valid_number(phonenumbers.parse(run, region))
        except phonenumbers.NumberParseException:
            return False
