"""Tasks: a data source, the prompt for a record and the reward for a completion."""
