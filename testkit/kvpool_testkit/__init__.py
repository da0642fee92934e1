"""kvpool_connector's test kit, shared by the tests, the demo and the benchmarks (installed from the checkout, not part
of the wheel): tiny local models, real pools and engines on loopback, clients, several hosts as network namespaces."""
