"""Running fedlora across machines with Flower 1.42's SuperLink and SuperNodes.

``certs``: a CA and a server certificate for the SuperLink's TLS; ``keys``: SuperNode key pairs and their
registration with the SuperLink (node authentication); ``federation``: the SuperLink connection entry that
``flwr run`` reads from ``$FLWR_HOME/config.toml``. The README section "Deploy on several machines" runs them.
"""

from __future__ import annotations

from fedlora.deploy.certs import ServerCertificates, make_certificates
from fedlora.deploy.federation import write_connection
from fedlora.deploy.keys import NodeKey, make_node_keys, register_nodes

__all__ = ["NodeKey", "ServerCertificates", "make_certificates", "make_node_keys", "register_nodes",
           "write_connection"]
