"""PII redaction (data_prep.pii): every planted e-mail, personal IP address and valid phone number
is replaced (recall), and real technical text is never rewritten (precision)."""

from __future__ import annotations

import re
from typing import get_args

import pytest

from data_prep.pii import EMAIL, IP_ADDRESS, PHONE, PII_ENTITIES, PIIRedactor
from pretrain_pipeline.config import ConfigError, DataConfig, PIIConfig, build_config


@pytest.fixture(scope="module")
def redactor() -> PIIRedactor:
    return PIIRedactor(**PIIConfig().model_dump())


# Technical text in which nothing is personal data: each must come out byte for byte unchanged.
TECHNICAL = {
    "date_man_page": """\
       -I[FMT], --iso-8601[=FMT]
              output date/time in ISO 8601 format.  FMT='date' for date only (the default),
              'hours', 'minutes', 'seconds', or 'ns' for date and time to the indicated precision.
              Example: 2006-08-14T02:34:56-06:00
       -R, --rfc-email
              output date and time in RFC 5322 format.  Example: Mon, 14 Aug 2006 02:34:56 -0600
       --rfc-3339=FMT
              Example: 2006-08-14 02:34:56-06:00
       %j     day of year (001..366)
GNU coreutils 9.1                         September 2022                                    DATE(1)""",
    "ip_address_man_page": """\
EXAMPLES
       ip address show dev eth0
              Shows the addresses assigned to network interface eth0
       ip address add 2001:0db8:85a3::0370:7334/64 dev eth1
              Adds an IPv6 address to network interface eth1.
       ip address add 10.1.1.1/24 brd + dev eth0 label eth0:1
       ip address delete 2001:0db8:85a3::0370:7334/64 dev eth1
       valid_lft LFT: see section 5.5.4 of RFC 4862.
iproute2                                   20 Dec 2011                              IP-ADDRESS(8)""",
    "hosts_man_page": """\
       # The following lines are desirable for IPv4 capable hosts
       127.0.0.1       localhost
       # 127.0.1.1 is often used for the FQDN of the machine
       127.0.1.1       thishost.example.org   thishost
       192.168.1.10    foo.example.org        foo
       192.168.1.13    bar.example.org        bar
       ::1             localhost ip6-localhost ip6-loopback
       ff02::1         ip6-allnodes
       fe80::1ff:fe23:4567:890a%eth0 link-local
Linux man-pages 6.03                        2022-10-30                                   hosts(5)""",
    "resolv_conf_sortlist": "       sortlist 130.155.160.0/255.255.240.0 130.155.0.0/16\n       nameserver 10.0.0.53",
    "rfc_documentation_addresses": """\
   For example, a host at 192.0.2.1 sends to 198.51.100.7 through the NAT at 203.0.113.254;
   the IPv6 equivalents are 2001:db8::1, 2001:db8:42::1 and 2001:DB8:0:0:8:800:200C:417A.
   Shared address space 100.64.0.1, link-local 169.254.10.20, multicast 224.0.0.251,
   broadcast 255.255.255.255, benchmarking 198.18.0.1 and the unspecified 0.0.0.0 and ::.""",
    "log_lines": """\
2012-10-30 18:17:16 INFO  [main] server started on port 8080 (pid 48213)
2003-01-23 00:29:50,411 WARN  org.apache.catalina.Session - expired 1027 sessions
[2024-03-05T14:22:07.123456Z] GET /api/v1/items/20230105 200 4821 0.0032s
Mar  3 23:05:25 host kernel: [12345.678901] eth0: link up, 1000 Mbps, full duplex
127.0.0.1 - - [10/Oct/2000:13:55:36 -0700] "GET /apache_pb.gif HTTP/1.0" 200 2326""",
    "git_log": """\
commit 3f2b9c1d0e4a5b6c7d8e9f00112233445566778899
Author: Keith Packard
Date:   Mon Oct 29 16:39:05 2018 -0700
CommitDate: Thu Sep 20 13:07:03 2018 -0700""",
    "uuids_and_hex_ids": """\
UUID 00010203-0405-0607-0809-0a0b0c0d0e0f, random 123e4567-e89b-12d3-a456-426614174000,
sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08, mac 00:1a:2b:3c:4d:5e,
pointer 0x7ffd5e8c1a20, object id 5f2b4c6d8e0a1b2c3d4e5f60.""",
    "hex_dump": """\
00000000  48 65 6c 6c 6f 2c 20 57  6f 72 6c 64 21 0a 00 01  |Hello, World!...|
00000010  02 ff 20 62 69 6e 61 72  79 20 31 32 33 34 35     |.. binary 12345|
0000001f
0000000 062564 064145 020163 062564 072170 005056
0000014""",
    "versions_and_sections": """\
Requires Python 3.10.12, OpenSSL 1.1.1w and version 1.2.3.4 of libfoo; see section 3.2.1 and
4.19.0.1 notes. Linux 2.6.36 (to be precise: 2.6.35.5) changed it. Build 10.0.19041.1288.
adwaita-icon-theme (3.38.2.1-2) unstable; at-spi2-core (2.38.0-4) experimental; urgency=medium""",
    "isbns_and_references": """\
Kernighan and Ritchie, ISBN 0-13-110362-8 (ISBN-13 978-0-13-110362-7), pp. 211-227 (1988).
Chen Li. VLDB J. 12(3): 211-227 (2003). Closes: #625898, #1643567.""",
    "numbers_in_prose_and_tables": """\
INT_MAX is 2147483647 and the epoch 1700000000 falls in 2023; pi is 3.14159 2.71828 apart.
Weights 0.5 0.25 0.125 0.0625, digits 0 1 2 3 4 5 6 7 8 9, gid 64040-64044, dims 1920 1080.
Free Software Foundation, 51 Franklin St, Fifth Floor, Boston, MA 02110-1301 USA.
Released 01.10.2012 and 10/30/2012; >>> float.fromhex('0x1.ffffp10') 2047.984375""",
    "code_and_numbers": "v1.2.3 at 12:30:45, a[::2], 2019-10-22, 1999 2000 2001, 3.14159",
    "ports_and_urls": """\
Listen on localhost:8080 and 0.0.0.0:443; connect to [::1]:5432 or http://127.0.0.1:9000/path;
ports 8080 8081 8082 are forwarded; ratio 16:9 at 18:17:16.""",
}


@pytest.mark.parametrize("name", sorted(TECHNICAL))
def test_technical_text_is_never_rewritten(redactor: PIIRedactor, name: str) -> None:
    text = TECHNICAL[name]
    out, counts = redactor.redact(text)
    assert out == text, [line for line in out.splitlines() if "<" in line]
    assert not counts


# (text with one planted item, the item, its entity): each must be replaced by its placeholder.
PLANTED = [
    ("Call our Paris office at +33 1 63 37 72 72 before noon.", "+33 1 63 37 72 72", "phone"),
    ("Berlin: +49 30 6489999, ask for Anna.", "+49 30 6489999", "phone"),
    ("Telefon 049 2237 2272 (Zentrale).", "049 2237 2272", "phone"),
    ("Reach me at (415) 555-0132 after six.", "(415) 555-0132", "phone"),
    ("Fax 415.555.0132 or write.", "415.555.0132", "phone"),
    ("Toll free: 1-800-555-0199.", "1-800-555-0199", "phone"),
    ("London desk +44 (0)20 7946 0958 is staffed.", "+44 (0)20 7946 0958", "phone"),
    ("call +44 20 7946 0958 now", "+44 20 7946 0958", "phone"),
    ("UK mobile 07700 900123, evenings.", "07700 900123", "phone"),
    ("Büro 030/6489999 oder mobil 0171 1234567.", "030/6489999", "phone"),
    ("Bureau : 01.63.37.72.72 ou 06 12 34 56 78.", "01.63.37.72.72", "phone"),
    ("Zürich office (+41) 44 668 18 00, Tokyo +81 3-1234-5678.", "(+41) 44 668 18 00", "phone"),
    ("Tel:+4930648999 is on the card.", "+4930648999", "phone"),
    ("Login from 93.184.216.34 at night.", "93.184.216.34", "ip"),
    ("The client 62.4.16.9 retried; server 172.217.16.142.", "172.217.16.142", "ip"),
    ("His IPv6 was 2a00:1450:4001:82a::200e yesterday.", "2a00:1450:4001:82a::200e", "ip"),
    ("Connect to 81.2.69.160:22 with your key.", "81.2.69.160", "ip"),
    ("Write to John.Doe+x@mail.example.co.uk today.", "John.Doe+x@mail.example.co.uk", "email"),
    ("Contact: jane_doe@example.org.", "jane_doe@example.org", "email"),
]
PLACEHOLDER = {"email": EMAIL, "ip": IP_ADDRESS, "phone": PHONE}


@pytest.mark.parametrize(("text", "item", "entity"), PLANTED, ids=[p[1] for p in PLANTED])
def test_planted_pii_is_redacted(redactor: PIIRedactor, text: str, item: str, entity: str) -> None:
    out, counts = redactor.redact(text)
    assert item not in out and PLACEHOLDER[entity] in out, out
    assert out == text.replace(item, PLACEHOLDER[entity], 1) or counts[entity] > 1
    assert counts[entity] >= 1


def test_every_planted_item_in_one_document_is_counted(redactor: PIIRedactor) -> None:
    document = "\n".join(text for text, _, _ in PLANTED) + "\n" + "\n".join(TECHNICAL.values())
    out, counts = redactor.redact(document)
    assert not [item for _, item, _ in PLANTED if item in out]
    assert "\n".join(TECHNICAL.values()) in out
    # Some sentences hold a second item of the same kind (a mobile next to an office number).
    assert counts == {"email": 2, "ip": 5, "phone": 16}


def test_national_numbers_follow_the_default_regions() -> None:
    us, de = PIIRedactor(["phone"], ["US"]), PIIRedactor(["phone"], ["DE"])
    assert us.redact("call 049 2237 2272")[0] == "call 049 2237 2272"
    assert de.redact("call 049 2237 2272")[0] == f"call {PHONE}"
    # DE numbers are written with their trunk prefix: (415) 555-0132 is American, not Berlin's 415 5550132.
    assert de.redact("call (415) 555-0132")[0] == "call (415) 555-0132"
    assert us.redact("call (415) 555-0132")[0] == f"call {PHONE}"
    # Written with +, a number is recognised whatever the regions; without a valid area code it is not.
    assert us.redact("call +33 1 63 37 72 72")[0] == f"call {PHONE}"
    assert us.redact("call (555) 123-4567")[0] == "call (555) 123-4567"


def test_entities_are_switchable() -> None:
    text = "mail a.b@example.com from 93.184.216.34 or call +49 30 6489999"
    assert PIIRedactor(["email"], ["DE"]).redact(text) == (
        f"mail {EMAIL} from 93.184.216.34 or call +49 30 6489999", {"email": 1})
    assert PIIRedactor(["ip", "phone"], ["DE"]).redact(text)[0] == f"mail a.b@example.com from {IP_ADDRESS} or call {PHONE}"
    assert PIIRedactor([], ["DE"]).redact(text) == (text, {})


def test_config_section_names_the_redactor_arguments() -> None:
    assert set(get_args(get_args(PIIConfig.model_fields["entities"].annotation)[0])) == set(PII_ENTITIES)
    assert DataConfig().pii.entities == list(PII_ENTITIES)
    off = build_config({"data": {"sample_corpus": True}}, ["data.pii.entities=[]"])
    assert off.data.pii.entities == []
    with pytest.raises(ConfigError, match=re.escape("data.pii_redact moved to data.pii.entities ([] turns redaction off)")):
        build_config({"data": {"sample_corpus": True, "pii_redact": False}})
    with pytest.raises(ConfigError, match=re.escape("regions ['XX'] are not supported by phonenumbers")):
        build_config({"data": {"sample_corpus": True}}, ['data.pii.phone_regions=["DE", "XX"]'])
    with pytest.raises(ConfigError, match="pii.entities"):
        build_config({"data": {"sample_corpus": True}}, ['data.pii.entities=["ssn"]'])
