"""capsule.toml and ato.delivery.toml readers that produce one typed model."""
