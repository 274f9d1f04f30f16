"""Runtime adapters for benchmarking (installed as ``edgepeft.runtimes``)."""
