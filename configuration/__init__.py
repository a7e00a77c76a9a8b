"""The model presets (`*.json`) and Accelerate configs (`accelerate/*.yaml`), shipped as `sonett.configuration`."""
