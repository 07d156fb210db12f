"""Every collective of torch.distributed and deepspeed.comm, patched for the probes to observe."""

COLLECTIVES = [
    "all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor",
    "_reduce_scatter_base", "broadcast", "reduce", "all_to_all", "all_to_all_single", "barrier", "send", "recv",
    "isend", "irecv", "scatter", "gather", "all_gather_object", "broadcast_object_list", "allgather_fn",
    "reduce_scatter_fn", "all_gather_coalesced", "all_reduce_coalesced", "inference_all_reduce", "monitored_barrier",
]


class CollectivePatch:
    """While active, each collective of `modules` is replaced by `self.wrap(module, name, fn)`."""

    def __init__(self, modules: list):
        self.modules = modules
        self._saved = []

    def wrap(self, module, name: str, fn):
        raise NotImplementedError

    def __enter__(self):
        for module in self.modules:
            for name in COLLECTIVES:
                fn = getattr(module, name, None)
                if callable(fn):
                    self._saved.append((module, name, fn))
                    setattr(module, name, self.wrap(module, name, fn))
        return self

    def __exit__(self, *exc):
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)
        self._saved = []
