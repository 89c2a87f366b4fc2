"""The durable store: one interface (`base.Store`), one implementation per database."""
