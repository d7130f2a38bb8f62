"""The base every benchmark is built on; each tool in `benchmarks/` is a thin command over these modules.

- `machine`: the machine, package versions and load average a result records;
- `documents`: a result document's command line and JSON file;
- `images`: test images (random noise, smooth photos) as bytes or data URLs;
- `processes`: a server's process tree: CPU seconds, roles, cores;
- `prometheus`, `stages`: the servers' metrics pages, and DvD's stages timed by their histograms;
- `placement`: pinned command lines (`taskset`), the one place a server is pinned;
- `servers`: a DvD stack or coupled `vllm serve` started on free ports;
- `encoder`: the vision model on random weights, timed on a device;
- the load loop: `workload` (requests) -> `loadgen` (sending them at a load) -> `metrics` (`vllm bench serve`'s
  figures) -> `sweep` (load points in turn, the results file);
- `search`: sustained goodput, the planner's rate search over measured runs (`sweep` runs it before the points);
- `options`: command-line options that several commands share.
"""
