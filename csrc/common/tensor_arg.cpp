#include "common/tensor_arg.h"

#include <map>
#include <sstream>

namespace py = pybind11;

namespace digfast {

std::string TensorArg::device() const {
  return device_index < 0 ? device_type : device_type + ":" + std::to_string(device_index);
}

std::string TensorArg::shape_str() const {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << (shape.size() == 1 ? ",)" : ")");
  return s.str();
}

namespace {

// torch.Tensor and torch's dtypes, looked up once (torch is imported by then: the tensors
// being checked come from it). Leaked on purpose: they live as long as the interpreter.
const py::handle& torch_attr(const char* name) {
  static std::map<std::string, py::handle>* cache = new std::map<std::string, py::handle>();
  auto it = cache->find(name);
  if (it == cache->end())
    it = cache->emplace(name, py::object(py::module_::import("torch").attr(name)).release()).first;
  return it->second;
}

}  // namespace

TensorArg read_tensor(const py::handle& obj, const char* name) {
  TensorArg t;
  t.name = name;
  if (!py::isinstance(obj, torch_attr("Tensor")))
    throw py::type_error(std::string(name) + " must be a torch.Tensor, got " +
                         py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>());
  t.data = obj.attr("data_ptr")().cast<uintptr_t>();
  for (const auto& s : obj.attr("shape")) t.shape.push_back(s.cast<int64_t>());
  t.dtype = obj.attr("dtype");
  const py::object device = obj.attr("device");
  t.device_type = device.attr("type").cast<std::string>();
  const py::object index = device.attr("index");
  t.device_index = index.is_none() ? -1 : index.cast<int>();
  t.contiguous = obj.attr("is_contiguous")().cast<bool>();
  return t;
}

void check_dtype(const TensorArg& t, const char* dtype) {
  if (!t.dtype.is(torch_attr(dtype)))
    throw py::type_error(t.name + " must have dtype torch." + dtype + ", got " +
                         py::str(t.dtype).cast<std::string>());
}

void check_shape(const TensorArg& t, const std::vector<int64_t>& shape) {
  if (t.shape != shape) {
    TensorArg want;
    want.shape = shape;
    throw py::value_error(t.name + " must have shape " + want.shape_str() + ", got " +
                          t.shape_str());
  }
}

void check_contiguous(const TensorArg& t) {
  if (!t.contiguous)
    throw py::value_error(t.name + " must be contiguous (call .contiguous()); got shape " +
                          t.shape_str() + " with non-contiguous strides");
}

void check_device_type(const TensorArg& t, const char* device_type) {
  if (t.device_type != device_type)
    throw py::value_error(t.name + " must be on a " + device_type + " device, got " +
                          t.device());
}

void check_same_device(const TensorArg& t, const TensorArg& ref) {
  if (t.device_type != ref.device_type || t.device_index != ref.device_index)
    throw py::value_error(t.name + " is on " + t.device() + " but " + ref.name + " is on " +
                          ref.device() + "; all tensors must be on one device");
}

}  // namespace digfast
