"""Methods mixed into vLLM's workers (`worker_extension_cls`), reached through `collective_rpc`."""

from __future__ import annotations

import language_server  # noqa: F401  (applies the torchvision work-around in the worker process)


class DvdWorkerExtension:
    def dvd_parameter_names(self) -> list[str]:
        """Names of every parameter the worker's model holds: proof of what was (not) loaded."""
        return [name for name, _ in self.get_model().named_parameters()]
