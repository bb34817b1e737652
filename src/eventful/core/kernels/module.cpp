// The Python module that loading the kernels imports: empty, since the kernels are operators
// of the dispatcher (torch.ops.eventful.*), registered by the other sources of this folder.

#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {}
