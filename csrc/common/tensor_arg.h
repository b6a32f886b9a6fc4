// Reading and checking torch tensors at the C++ boundary without linking libtorch.
//
// A binding takes each tensor as a py::object and reads what it needs through ordinary
// attribute access (data_ptr(), shape, dtype, device, is_contiguous()) into a TensorArg;
// the check_* helpers then raise Python errors that name the argument. (About a
// microsecond per tensor: the torch.Tensor type and dtypes are looked up once.)
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

namespace digfast {

struct TensorArg {
  std::string name;             // the argument's name, for messages
  uintptr_t data = 0;           // data_ptr()
  std::vector<int64_t> shape;
  pybind11::object dtype;       // the torch.dtype object
  std::string device_type;      // "cpu", "cuda", ...
  int device_index = -1;        // -1 when the device has no index
  bool contiguous = false;

  int64_t dim() const { return static_cast<int64_t>(shape.size()); }
  int64_t size(int64_t i) const { return shape.at(static_cast<size_t>(i)); }
  std::string device() const;        // "cpu", "cuda:0"
  std::string shape_str() const;     // "(2, 5, 3)"
  template <typename T>
  T* ptr() const { return reinterpret_cast<T*>(data); }
};

// Reads a torch.Tensor argument; raises TypeError when `obj` is not a tensor.
TensorArg read_tensor(const pybind11::handle& obj, const char* name);

// Each raises a Python exception whose message names the argument and what was expected.
// dtype is a torch attribute name: "float32", "int64", "bool".
void check_dtype(const TensorArg& t, const char* dtype);                 // TypeError
void check_shape(const TensorArg& t, const std::vector<int64_t>& shape);  // ValueError
void check_contiguous(const TensorArg& t);                                // ValueError
void check_device_type(const TensorArg& t, const char* device_type);      // ValueError
void check_same_device(const TensorArg& t, const TensorArg& ref);         // ValueError

}  // namespace digfast
