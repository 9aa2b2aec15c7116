"""The GPU bench behind scripts/gpu-bench: bare diffusers against Atelier's engine, side by side.

Modules: deps (what must be installed, checked with the standard library alone), record (timers,
peak memory, the time budget, the table and the JSON), harness (the model, settings, the bare
diffusers loop and job helpers), sections (the core measurements), extras (LoRA, ControlNet,
upscalers), cli (argument parsing and the order of the run).
"""
