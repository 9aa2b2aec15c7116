"""The engine's call for each job kind, one module each, read top to bottom like a diffusers
example. The registry (engine.jobs) names each kind's `run`; the Runner (engine.pipelines) holds
what they share: fresh pipelines, prompt encoding, the img2img call, progress and cancelling."""
