"""The CPU extension (build, sources in csrc/) and OpenMP thread handling."""
