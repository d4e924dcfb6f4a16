"""Named in a config's `plugins:` list: adds an experts kernel called `example_torch`."""
from composer.kernels.torch_backend import TorchExperts
from composer.registry import KERNELS


@KERNELS.register("example_torch")
class ExampleTorchExperts(TorchExperts):
    name = "example_torch"
