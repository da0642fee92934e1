"""kvpool_connector: a vLLM KV connector that keeps prompt KV blocks in a shared memory pool (memcache, Mooncake).

Import the connector class from ``kvpool_connector.connector``; this package root stays import-light so that
vLLM's plugin loader and the tests can import it without pulling vLLM in.
"""

__version__ = "0.1.0"
