"""The queue: fair order (fairqueue), dispatch to the engine (scheduler), ETAs (eta)."""
