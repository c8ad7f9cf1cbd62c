"""Decoding strategies, one module each; importing this package registers them all (see base.STRATEGIES)."""

from strategies import greedy, sample, mirostat  # noqa: F401
from strategies import momentum, contrastive_search  # noqa: F401
from strategies import beam, diverse_beam  # noqa: F401
from strategies import ead, speculative  # noqa: F401
from strategies import gcd, asap  # noqa: F401
from strategies import superposed  # noqa: F401
from strategies import contrastive, uscd  # noqa: F401
from strategies.base import STRATEGIES, get_strategy  # noqa: F401
