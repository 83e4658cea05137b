"""Training: the engine (one process or one Ray worker), the optimiser and schedule, experiment
tracking and weight transfer (`model.init_from`)."""
