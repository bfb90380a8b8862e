"""Benchmark scripts, each run from the repository root as `python -m benchmarks.<name>`
(benchmarks/README.md). Their reusable logic lives in `redrafter.bench` and `redrafter.demo`;
`benchmarks._common` holds what only the scripts share (machine facts, idleness, saving)."""
