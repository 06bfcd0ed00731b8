"""Word-level explanations: which of the words a user typed pushed a run towards a label, and how much.

Two methods: occlusion (leave one word out, all variants in one batch; any backend, the int8 ONNX model a
server runs included) and integrated gradients (captum, PyTorch runs only). Sub-word tokens are merged back
into the words of the text as typed (:mod:`tuneforge.explain.words`).
"""

from tuneforge.explain.core import MAX_WORDS, METHODS, Explanation, explain

__all__ = ["MAX_WORDS", "METHODS", "Explanation", "explain"]
