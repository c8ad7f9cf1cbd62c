"""Decoding strategies, one module each. This package is the built-in plug-in of the entry-point group
`declab.strategies` (pyproject.toml): the engine's registry imports it on first use, which registers every module
below. Each module imports only the engine's contract, declab.core."""

from strategies import greedy, sample, mirostat  # noqa: F401
from strategies import momentum, contrastive_search  # noqa: F401
from strategies import beam, diverse_beam  # noqa: F401
from strategies import ead, speculative, spec_tree  # noqa: F401
from strategies import gcd, asap  # noqa: F401
from strategies import superposed  # noqa: F401
from strategies import contrastive, uscd  # noqa: F401
from strategies import sampler_chain  # noqa: F401
from strategies import cautious, adadec  # noqa: F401
