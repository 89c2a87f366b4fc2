"""Background work: fan-out of committed messages into inboxes, and inbox retention."""
