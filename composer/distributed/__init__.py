"""Expert parallelism: all2all backends (the modular kernel's prepare/finalize) and expert placement."""
