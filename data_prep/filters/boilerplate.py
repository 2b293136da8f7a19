"""Boilerplate pages: cookie and consent banners, privacy and terms notices, navigation menus,
footers, sign-in, subscribe and share prompts, kept whole by text extractors.

C4 drops every line that mentions a policy or javascript and every document under five sentences,
which also removes code, lists and man pages. This filter looks at lines instead: a line is
*boilerplate* when it is a notice (a consent, legal, account or sharing phrase in a line short
enough to be that notice and not prose that mentions one), a menu of short items ("Home | News |
Sport", "Home » Products") or a short line made only of navigation and button words ("About
Us", "Accept all", "Log in"). A document with too high a share of such lines is dropped;
technical text about cookies, privacy, subscriptions or logins writes those words inside
sentences and keeps its share low. tests/data/boilerplate_labelled.jsonl and
bench/clean/boilerplate.py measure it against datatrove's C4 filter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from data_prep.filters.base import DocStats, Filter

# Phrases that make a line a notice, not a sentence about one (lowercase text), each filed under a
# string it contains: a line is only searched for the phrases whose string it holds, which keeps
# this filter at a few microseconds a line (one regex of all phrases tries each at every position).
_NOTICE_PHRASES: dict[str, str] = {
    "cookies": r"\b(?:we|this (?:web)?site|our (?:web)?site|this page|partners)(?: and our partners)? "
    r"(?:use|uses|is using|store|stores|may use|'d like to use) (?:\w+ )?cookies"
    r"|\b(?:accept|allow|reject|decline|manage|customi[sz]e|deny|set|view|enable)(?: all| additional| necessary| optional)? cookies\b"
    r"|\b(?:use|storing) of cookies\b|\b(?:to use|uses) cookies\b"
    r"|\b(?:necessary|essential|performance|targeting|functional|analytics|marketing|advertising) cookies\b",
    "cookie": r"\bcookie (?:settings|preferences|policy|notice|statement|consent|page)\b",
    "technologies": r"\b(?:we|partners) (?:use|store) (?:\w+ )?technologies\b",
    "consent": r"\bconsent (?:preferences|to our)\b|\bmanage consent\b",
    "agree": r"\bby (?:continuing|using|clicking|browsing|accessing|signing up|visiting)\b.*\bagree",
    "accept": r"\bby (?:continuing|using|clicking|browsing|accessing|visiting)\b.*\baccept",
    "reserved": r"\ball rights reserved\b",
    "(c)": r"\(c\) (?:19|20)\d\d",
    "copyright": r"\bcopyright (?:©|\(c\) )?(?:19|20)\d\d",
    "privacy": r"\bprivacy (?:policy|notice|statement|choices|settings|preferences)\b",
    "sell": r"\bdo not sell\b",
    "terms": r"\bterms (?:of (?:use|service)|and conditions|& conditions)\b",
    "subscribe": r"\bsubscribe (?:to|for|now)\b",
    "sign": r"\bsign up (?:to|for|now)\b|\bsign in to (?:your|continue)\b",
    "newsletter": r".", "newsletters": r".",
    "unsubscribe": r"\bunsubscribe at any time\b",
    "share": r"\bshare (?:this|on|via)\b",
    "pin": r"\bpin (?:it|this|recipe)\b",
    "follow": r"\bfollow us\b",
    "like": r"\blike us on\b|\byou might also like\b",
    "click": r"\bclick (?:to (?:share|email)|here)\b",
    "skip": r"\bskip to (?:main )?content\b",
    "back": r"\bback to (?:top|homepage)\b",
    "navigation": r"\b(?:toggle|open|close|jump to) navigation\b",
    "menu": r"\bmain menu\b",
    "password": r"\bforgot (?:your )?password\b",
    "account": r"\balready have an account\b|\bcreate (?:an? )?account\b|\bdon't have an account\b",
    "subscriber": r"\balready a subscriber\b",
    "remember": r"\bremember me\b",
    "leave": r"\bleave a (?:reply|comment)\b",
    "related": r"\brelated (?:posts|articles|products|stories)\b",
    "post": r"\b(?:previous|next) post\b",
    "article": r"\b(?:previous|next) article\b",
    "powered": r"\bpowered by\b",
    "theme": r"\btheme by\b",
    "window": r"\bopens in (?:a )?new window\b",
    "advertisement": r".",
    "sponsored": r"\bsponsored content\b",
    "recommended": r"\brecommended for you\b",
    "reading": r"^continue reading\b",
    "read": r"^read more\b",
    "helpful": r"\bwas this page helpful\b",
    "contact": r"\bcontact us\b",
    "hours": r"\bopening hours\b",
    "page": r"\bpage \d+ of \d+\b|\bper page\b|\bpage not found\b|\breturn to (?:the )?home ?page\b",
    "sort": r"\bsort by\b",
    "published": r"\bwill not be published\b",
    "required": r"\brequired fields are marked\b",
    "save": r"\bsave my name\b",
    "app": r"\bdownload (?:our|the) app\b|\bapp store\b",
    "play": r"\bgoogle play\b",
    "thank": r"\bthank you for (?:subscribing|signing up|registering)\b",
    "confirm": r"\bconfirm your (?:subscription|email)\b",
    "javascript": r"\benable javascript\b|\bjavascript is disabled\b",
    "captcha": r".",
    "forbidden": r"\b403 forbidden\b",
    "found": r"\b404 not found\b",
    "search": r"\bjump to search\b",
    "homepage": r"\breturn to (?:the )?homepage\b",
    "next": r"^(?:[\d.…]+\s+){2,}next\b",  # pagination: "1 2 3 4 5 ... 12 Next »"
}
_NOTICE = {word: re.compile(pattern) for word, pattern in _NOTICE_PHRASES.items()}
# Words a menu, a button or a footer link is made of.
_NAV_WORDS = frozenset(
    """home about us our contact blog news shop store products product services solutions pricing portfolio
    search menu navigation sign log in out up register subscribe account my cart wishlist checkout careers jobs
    press legal privacy terms cookies cookie imprint impressum sitemap site map accessibility help support faq
    archives archive categories tags rss feed feeds comments entries meta login logout faqs donate advertise
    accept reject allow deny decline agree ok okay got it learn find more settings preferences customize
    customise manage dismiss close save confirm continue all choices cancel yes no print email share tweet
    facebook twitter instagram linkedin youtube pinterest tiktok whatsapp reddit like follow more next previous
    prev back top page recent popular latest trending newsletters newsletter forums members partners investors
    company team events resources community downloads gift cards order orders shipping track locations
    locator new arrivals sale deals offers view statement notice policy policies disclaimer disclaimers
    security status developers apps app the a and of to for with your & - statistics marketing functional
    filter sort comment comments post reply website enable disable changes me""".split()
)
# A menu on one line: three or more short items between separators ("Home | News | Sport"), each
# a link name (capitalised or a navigation word); a table row ("| timeout | int | 30 |") is not one.
_MENU_SEPARATOR = re.compile(r"\s+[|»›·•/>]\s+")
_ARCHIVE_LINK = re.compile(
    r"(?:january|february|march|april|may|june|july|august|september|october|november|december) (?:19|20)\d\d"
    r"|[\w &'-]{1,40} \(\d+\)"
)
_WORD = re.compile(r"[\w&'-]+")


def _has_phrase(low: str, phrases) -> bool:
    """Whether lowercase ``low`` holds one of ``phrases`` ((key, pattern) pairs), trying a pattern
    only where its key string occurs."""
    return any(key in low and pattern.search(low) for key, pattern in phrases)


def _is_link(line: str) -> bool:
    """A menu entry's shape: one to four words, capitalised, not indented (code and man pages
    are), no sentence punctuation at the end ("Campus Life", "Current events")."""
    words = line.split()
    return 0 < len(words) <= 4 and line[0].isupper() and line.rstrip()[-1] not in ".!?:;,"


def _is_menu(line: str) -> bool:
    items = _MENU_SEPARATOR.split(line)
    return len(items) >= 3 and all(
        0 < len(item.split()) <= 4 and (item[0].isupper() or item.split()[0].lower() in _NAV_WORDS) for item in items
    )


@dataclass(kw_only=True)
class Boilerplate(Filter):
    """Drops documents whose share of notice and navigation lines is at least ``max_notice_line_ratio``,
    unless those lines are a footer under prose (``is_footer``)."""

    name = "boilerplate"

    max_notice_line_ratio: float
    max_notice_line_words: int
    max_nav_line_words: int
    min_menu_block_lines: int
    footer_max_char_share: float

    def _is_nav(self, line: str) -> bool:
        """A short line of navigation and button words ("About Us", "Accept all") or an archive link."""
        if len(line) > 16 * self.max_nav_line_words or len(line.split()) > self.max_nav_line_words:
            return False  # cheap tests first: most lines are longer than any menu entry
        low = line.lower()
        words = _WORD.findall(low)
        return 0 < len(words) <= self.max_nav_line_words and (
            all(w in _NAV_WORDS for w in words) or _ARCHIVE_LINK.fullmatch(low.strip(" .:")) is not None
        )

    def _is_notice(self, line: str, phrases: list[tuple[str, re.Pattern]]) -> bool:
        low = line.lower()
        return ("©" in line or _has_phrase(low, phrases)) and len(low.split()) <= self.max_notice_line_words

    def boilerplate_lines(self, lines: list[str]) -> list[bool]:
        """Per line: a notice, navigation or menu line, or a line of a menu block
        (``min_menu_block_lines`` or more link-like lines in a row)."""
        # Only the phrases whose string the document holds are tried, on the lines holding it.
        low = "\n".join(lines).lower()
        phrases = [(key, pattern) for key, pattern in _NOTICE.items() if key in low]
        flags = [
            self._is_nav(line.strip()) or self._is_notice(line, phrases) or (_MENU_SEPARATOR.search(line) is not None and _is_menu(line.strip()))
            for line in lines
        ]
        run: list[int] = []
        for i, line in enumerate([*lines, ""]):
            if i < len(lines) and (flags[i] or _is_link(line)):
                run.append(i)
                continue
            if len(run) >= self.min_menu_block_lines:
                for j in run:
                    flags[j] = True
            run = []
        return flags

    def is_boilerplate_line(self, line: str) -> bool:
        """Whether one line, on its own, is a notice, navigation or menu line."""
        return self.boilerplate_lines([line])[0]

    def is_footer(self, lines: list[str], flags: list[bool]) -> bool:
        """Notice lines that are many but short after prose holding most of the text and no notice
        phrase: an article followed by Share / Tweet / Email, not a banner with buttons."""
        chars = [len(line.strip()) for line in lines]
        if sum(c for c, flag in zip(chars, flags) if flag) >= self.footer_max_char_share * sum(chars):
            return False
        prose = "\n".join(line for line, flag in zip(lines, flags) if not flag).lower()
        return not _has_phrase(prose, _NOTICE.items())

    def check(self, text: str, stats: DocStats) -> str | None:
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return None
        flags = self.boilerplate_lines(lines)
        if sum(flags) / len(lines) < self.max_notice_line_ratio or self.is_footer(lines, flags):
            return None
        return "notice_lines"
