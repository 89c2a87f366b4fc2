"""The ephemeral bus: presence registry, routing between gateways. One interface, per backend."""
