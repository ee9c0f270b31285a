"""Server-side aggregation: one module per federated LoRA method, all registered by name.

Importing this package imports every method module so that :func:`get_aggregator` knows them all.
"""

from __future__ import annotations

import fedlora.aggregation.fedsa_lora  # noqa: F401  (register)
import fedlora.aggregation.flexlora  # noqa: F401  (register)
import fedlora.aggregation.hetlora  # noqa: F401  (register)
from fedlora.aggregation import fed_sb, fedex_lora, fedit, fedsvd, ffa, flora, lora_fair, rolora  # noqa: F401
from fedlora.aggregation.base import (
    Aggregator,
    AggregatorConfig,
    ClientUpdate,
    ServerContext,
    aggregator_class,
    available,
    get_aggregator,
    option_fields,
)

__all__ = ["Aggregator", "AggregatorConfig", "ClientUpdate", "ServerContext", "aggregator_class", "available",
           "get_aggregator", "option_fields"]
