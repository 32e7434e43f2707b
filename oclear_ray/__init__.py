"""oclear-ray: image-to-multi-modal retrieval on Ray.

The library imports without starting Ray. Stages, in the order data flows through them:
read (``contract``, ``read``) -> govern -> train -> embed -> index -> serve -> evaluate.
"""

__version__ = "0.1.0"
