// mlmath_native._core: the compiled module.  Selecting the ISA happens at import, so a bad
// MLMATH_NATIVE_ISA fails the import with a message naming what this CPU supports.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings/without_gil.h"
#include "mlmath/mlmath.h"

namespace mlmath::bindings {
void bind_softmax(pybind11::module_& m);
void bind_output_cache(pybind11::module_& m);
void bind_cross_entropy(pybind11::module_& m);
void bind_linear_cross_entropy(pybind11::module_& m);
void bind_optim(pybind11::module_& m);
void bind_gemm(pybind11::module_& m);
void bind_conv(pybind11::module_& m);
void bind_attention(pybind11::module_& m);
}  // namespace mlmath::bindings

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "mlmath_native compiled kernels (use the wrappers in mlmath_native instead)";
  mlmath::kernels();                         // pick the ISA now; throws for a bad MLMATH_NATIVE_ISA
  mlmath::bindings::remember_main_thread();  // Ctrl-C polls there (Note [kernels without the GIL])

  m.attr("__version__") = mlmath::version();
  m.def("build_info", []() {
    py::dict d;
    d["version"] = mlmath::version();
    d["isa"] = mlmath::selected_isa();
    d["isa_supported"] = mlmath::supported_isas();
    d["isa_compiled"] = mlmath::compiled_isas();
    d["openmp"] = mlmath::have_openmp();
    d["openmp_version"] = mlmath::openmp_version();
    d["num_threads"] = mlmath::get_num_threads();
    d["compiler"] = mlmath::compiler();
    return d;
  });
  m.def("get_num_threads", &mlmath::get_num_threads);
  m.def("set_num_threads", &mlmath::set_num_threads, py::arg("n"));
  m.def("select_isa", &mlmath::select_isa, py::arg("name"));
  mlmath::bindings::bind_softmax(m);
  mlmath::bindings::bind_output_cache(m);
  mlmath::bindings::bind_cross_entropy(m);
  mlmath::bindings::bind_linear_cross_entropy(m);
  mlmath::bindings::bind_optim(m);
  mlmath::bindings::bind_gemm(m);
  mlmath::bindings::bind_conv(m);
  mlmath::bindings::bind_attention(m);
}
