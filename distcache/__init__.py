"""distcache: Redis caches with read-through, invalidation and stampede control (in progress).

The cache itself lands with its own issue; this package already exposes the error types it
will raise, so code can be written against them.
"""

from distkit import CacheError, SerializationError

__all__ = ["CacheError", "SerializationError"]
