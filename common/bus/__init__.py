"""The bus: topology, publishing with confirms, and the consumer runner that maps outcomes."""
