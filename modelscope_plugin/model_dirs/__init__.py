"""Model directories and checkpoint files in every supported layout -> (configuration, network)."""
