"""Everything around the numerical engine: config, I/O, watching, dispatch, durable state, CLI."""
