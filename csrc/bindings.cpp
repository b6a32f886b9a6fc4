// digfast._C: the pybind11 module. Every tensor argument is read and checked here (dtype,
// shape, contiguity, device) with a message naming it; the kernels get a plain params
// struct of raw pointers (no libtorch link).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <string>

#include "build_info.h"
#include "common/philox.h"
#include "common/tensor_arg.h"
#include "philox_normal/philox_normal.h"
#include "sampler_step/sampler_step.h"

namespace py = pybind11;
using namespace digfast;

namespace {

// An integer-like Python object (int, numpy integer, ...) checked to lie in [0, 2^bits).
uint64_t read_unsigned(const py::handle& value, const char* name, int bits) {
  PyObject* index = PyNumber_Index(value.ptr());
  if (!index) {
    PyErr_Clear();
    throw py::type_error(std::string(name) + " must be an integer, got " +
                         py::str(py::type::handle_of(value).attr("__name__")).cast<std::string>());
  }
  const py::object v = py::reinterpret_steal<py::object>(index);
  const unsigned long long u = PyLong_AsUnsignedLongLong(v.ptr());  // fails if < 0 or >= 2^64
  const bool failed = u == static_cast<unsigned long long>(-1) && PyErr_Occurred();
  if (failed) PyErr_Clear();
  if (failed || (bits < 64 && u >> bits))
    throw py::value_error(std::string(name) + " must be in [0, 2**" + std::to_string(bits) +
                          "), got " + py::str(v).cast<std::string>());
  return u;
}

void check_sample_ids_range(const int64_t* ids, int64_t n) {
  for (int64_t s = 0; s < n; ++s) {
    if (ids[s] < 0 || ids[s] > int64_t{0xFFFFFFFF})
      throw py::value_error("sample_ids must lie in [0, 2**32), got " + std::to_string(ids[s]) +
                            " at position " + std::to_string(s));
  }
}

// Reads and checks the arguments shared by the CPU and CUDA entry points.
SamplerStepParams sampler_step_params(const py::handle& out_obj, const py::handle& x_obj,
                                      const py::handle& direction_obj, double a, double b,
                                      double c, const py::handle& seed_obj,
                                      const py::handle& ids_obj, const py::handle& step_obj,
                                      const py::handle& mask_obj, const char* device_type,
                                      TensorArg& x) {
  x = read_tensor(x_obj, "x");
  check_device_type(x, device_type);
  check_dtype(x, "float32");
  if (x.dim() != 3)
    throw py::value_error("x must be (batch, atoms, dim), got shape " + x.shape_str());
  const int64_t batch = x.size(0), atoms = x.size(1), dim = x.size(2);
  if (dim != 2 && dim != 3)
    throw py::value_error("x's last dimension (coordinates) must be 2 or 3, got shape " +
                          x.shape_str());
  if (atoms < 1) throw py::value_error("x must have at least one atom, got shape " + x.shape_str());
  if (atoms * dim > (int64_t{1} << 34))
    throw py::value_error("atoms * dim must be at most 2**34 (the Philox block counter is "
                          "32-bit), got shape " + x.shape_str());
  check_contiguous(x);

  const TensorArg direction = read_tensor(direction_obj, "direction");
  check_same_device(direction, x);
  check_dtype(direction, "float32");
  check_shape(direction, x.shape);
  check_contiguous(direction);

  const TensorArg out = read_tensor(out_obj, "out");
  check_same_device(out, x);
  check_dtype(out, "float32");
  check_shape(out, x.shape);
  check_contiguous(out);

  const TensorArg ids = read_tensor(ids_obj, "sample_ids");
  check_same_device(ids, x);
  check_dtype(ids, "int64");
  check_shape(ids, {batch});
  check_contiguous(ids);

  const uint8_t* mask_ptr = nullptr;
  if (!mask_obj.is_none()) {
    const TensorArg mask = read_tensor(mask_obj, "mask");
    check_same_device(mask, x);
    check_dtype(mask, "bool");
    check_shape(mask, {batch, atoms});
    check_contiguous(mask);
    mask_ptr = mask.ptr<const uint8_t>();
  }

  SamplerStepParams p{};
  p.x = x.ptr<const float>();
  p.direction = direction.ptr<const float>();
  p.out = out.ptr<float>();
  p.sample_ids = ids.ptr<const int64_t>();
  p.mask = mask_ptr;
  p.batch = batch;
  p.atoms = atoms;
  p.dim = dim;
  p.a = static_cast<float>(a);
  p.b = static_cast<float>(b);
  p.c = static_cast<float>(c);
  p.seed = read_unsigned(seed_obj, "seed", 64);
  p.step = static_cast<uint32_t>(read_unsigned(step_obj, "step", 32));
  p.stream = kStreamStep;
  return p;
}

void sampler_step_cpu_binding(const py::object& out, const py::object& x_obj,
                              const py::object& direction, double a, double b, double c,
                              const py::object& seed, const py::object& sample_ids,
                              const py::object& step, const py::object& mask, int num_threads) {
  TensorArg x;
  const SamplerStepParams p =
      sampler_step_params(out, x_obj, direction, a, b, c, seed, sample_ids, step, mask, "cpu", x);
  if (num_threads < 1)
    throw py::value_error("num_threads must be >= 1, got " + std::to_string(num_threads));
  // ids are only read as Philox counters, so (as in the reference) only checked then
  if (p.c != 0.0f) check_sample_ids_range(p.sample_ids, p.batch);
  py::gil_scoped_release release;
  sampler_step_cpu(p, num_threads);
}

#ifdef DIGFAST_WITH_CUDA
void sampler_step_cuda_binding(const py::object& out, const py::object& x_obj,
                               const py::object& direction, double a, double b, double c,
                               const py::object& seed, const py::object& sample_ids,
                               const py::object& step, const py::object& mask,
                               uintptr_t stream) {
  TensorArg x;
  const SamplerStepParams p = sampler_step_params(out, x_obj, direction, a, b, c, seed,
                                                  sample_ids, step, mask, "cuda", x);
  // Sample ids are taken modulo 2^32 here: checking them would need a device sync.
  py::gil_scoped_release release;
  sampler_step_cuda(p, x.device_index < 0 ? 0 : x.device_index, stream);
}
#endif

void philox_normal_cpu_binding(const py::object& out_obj, const py::object& seed,
                               const py::object& ids_obj, const py::object& step,
                               const py::object& stream, int num_threads) {
  const TensorArg out = read_tensor(out_obj, "out");
  check_device_type(out, "cpu");
  check_dtype(out, "float32");
  if (out.dim() != 2)
    throw py::value_error("out must be (batch, numel), got shape " + out.shape_str());
  check_contiguous(out);
  if (out.size(1) > (int64_t{1} << 34))
    throw py::value_error("numel must be at most 2**34 (32-bit Philox block counter)");
  const TensorArg ids = read_tensor(ids_obj, "sample_ids");
  check_same_device(ids, out);
  check_dtype(ids, "int64");
  check_shape(ids, {out.size(0)});
  check_contiguous(ids);
  if (num_threads < 1)
    throw py::value_error("num_threads must be >= 1, got " + std::to_string(num_threads));
  PhiloxNormalParams p{};
  p.out = out.ptr<float>();
  p.sample_ids = ids.ptr<const int64_t>();
  p.batch = out.size(0);
  p.numel = out.size(1);
  p.seed = read_unsigned(seed, "seed", 64);
  p.step = static_cast<uint32_t>(read_unsigned(step, "step", 32));
  p.stream = static_cast<uint32_t>(read_unsigned(stream, "stream", 32));
  check_sample_ids_range(p.sample_ids, p.batch);
  py::gil_scoped_release release;
  philox_normal_cpu(p, num_threads);
}

py::tuple philox4x32_10_binding(const py::tuple& counter, const py::tuple& key) {
  if (counter.size() != 4 || key.size() != 2)
    throw py::value_error("philox4x32_10 takes a counter of 4 words and a key of 2 words");
  uint32_t c[4], k[2];
  for (int i = 0; i < 4; ++i) c[i] = static_cast<uint32_t>(read_unsigned(counter[i], "counter word", 32));
  for (int i = 0; i < 2; ++i) k[i] = static_cast<uint32_t>(read_unsigned(key[i], "key word", 32));
  const Philox4 r = philox4x32_10(c[0], c[1], c[2], c[3], k[0], k[1]);
  return py::make_tuple(r.w[0], r.w[1], r.w[2], r.w[3]);
}

py::dict build_info() {
  py::dict info;
  info["version"] = DIGFAST_VERSION;
  info["build_type"] = DIGFAST_BUILD_TYPE;
  info["cxx_compiler"] = DIGFAST_CXX_COMPILER;
#ifdef DIGFAST_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_option"] = static_cast<bool>(DIGFAST_CUDA_OPTION);
  info["cuda_compiler"] = DIGFAST_CUDA_COMPILER;
  info["cuda_archs"] = DIGFAST_CUDA_ARCHS;
  info["cuda_status"] = DIGFAST_CUDA_STATUS;
  info["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." +
                     std::to_string(PYBIND11_VERSION_MINOR) + "." +
                     std::to_string(PYBIND11_VERSION_PATCH);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "digfast compiled core: C++ CPU kernels, and CUDA kernels when built with CUDA";

  m.def("has_cuda",
        [] {
#ifdef DIGFAST_WITH_CUDA
          return true;
#else
          return false;
#endif
        },
        "True when the CUDA kernels were compiled in (the module never needs a GPU to import).");
  m.def("build_info", &build_info,
        "How this module was built: compilers, CUDA version and architectures, options.");

  m.def("sampler_step_cpu", &sampler_step_cpu_binding, py::arg("out"), py::arg("x"),
        py::arg("direction"), py::arg("a"), py::arg("b"), py::arg("c"), py::arg("seed"),
        py::arg("sample_ids"), py::arg("step"), py::arg("mask").none(true),
        py::arg("num_threads"),
        "out = P_mask(a*x + b*direction + c*z) on the CPU, written into `out` (which may "
        "alias x or direction). See digfast.ops.sampler_step.");
#ifdef DIGFAST_WITH_CUDA
  m.def("sampler_step_cuda", &sampler_step_cuda_binding, py::arg("out"), py::arg("x"),
        py::arg("direction"), py::arg("a"), py::arg("b"), py::arg("c"), py::arg("seed"),
        py::arg("sample_ids"), py::arg("step"), py::arg("mask").none(true),
        py::arg("stream"),
        "The CUDA sampler step, launched asynchronously on `stream` (a cudaStream_t as an "
        "integer) on x's device. Sample ids are taken modulo 2**32 (not checked: no sync).");
#endif
  m.def("philox_normal_cpu", &philox_normal_cpu_binding, py::arg("out"), py::arg("seed"),
        py::arg("sample_ids"), py::arg("step"), py::arg("stream"), py::arg("num_threads"),
        "Fills out (batch, numel) with digfast.ops.philox.philox_normal's normals (CPU).");
  m.def("philox4x32_10", &philox4x32_10_binding, py::arg("counter"), py::arg("key"),
        "Philox4x32-10 of one counter (4 words) and key (2 words), for known-answer tests.");
}
