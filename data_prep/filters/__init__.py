"""Document quality filters, one family per module as in datatrove: Gopher quality and
repetition, C4 and FineWeb, with the rules and order of datatrove's implementations.

Every filter takes its settings by keyword, under the names of its ``data.<name>`` config section
(``GopherQuality(**cfg.data.gopher_quality.params())``); the defaults live in that section.
"""

from data_prep.filters.base import DocStats, Drop, Filter, LineFilter
from data_prep.filters.boilerplate import Boilerplate
from data_prep.filters.c4 import C4Quality
from data_prep.filters.decontamination import BenchmarkNgrams, Decontaminate
from data_prep.filters.fineweb import FineWebQuality
from data_prep.filters.gopher_quality import GopherQuality
from data_prep.filters.gopher_repetition import GopherRepetition

__all__ = ["BenchmarkNgrams", "Boilerplate", "C4Quality", "Decontaminate", "DocStats", "Drop", "Filter", "FineWebQuality",
           "GopherQuality", "GopherRepetition", "LineFilter"]
