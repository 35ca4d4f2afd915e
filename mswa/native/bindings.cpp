// The Python names of the native kernels. Each releases Python's lock while it runs.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  const auto unlocked = py::call_guard<py::gil_scoped_release>();
  module.def("ring_step", &ring_step, unlocked);
  module.def("band_forward", &band_forward, unlocked);
  module.def("band_backward", &band_backward, unlocked);
}
