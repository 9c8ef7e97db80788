"""What the device knows: the examples it was taught and how a frame is matched against them.

The store (``knn``: ``KnnStore``), its rows, examples and pictures, the class-name rule, the
matcher (``matcher``) that classifies with the head and the scan index, the file format and its
lock, and import/export. Plain numpy: it imports no model, camera or edge.
"""
