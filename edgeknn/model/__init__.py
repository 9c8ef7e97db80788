"""The neural network side: TFLite interpreters, the Embedder, the named models and their download,
classifier models (top-k labels), the inference thread, and re-embedding a store for another model.
"""
