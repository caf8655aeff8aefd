"""The synthesis engine: tumour masks, model-based and diffusion synthesis, blending, weights.

Entry point: :class:`backend.synthesis.engine.SynthesisEngine` (imported lazily to keep
``import backend.synthesis`` light).
"""
