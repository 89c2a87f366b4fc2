"""One contract suite for every `pigeon.store.base.Store` implementation."""
