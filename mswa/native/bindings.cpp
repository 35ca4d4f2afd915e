// The Python names of the native kernels. Each releases Python's lock while it runs (see band_chunks.cpp).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  const auto unlocked = py::call_guard<py::gil_scoped_release>();
  module.def("ring_step", &ring_step, unlocked);
  module.def("band_forward_chunk", &band_forward_chunk, unlocked);
  module.def("band_backward_chunk", &band_backward_chunk, unlocked);
}
